"""The files of the ``circuit-tracer`` library: read into the native layout, and write back.

Per-layer transcoders: a directory of ``layer_{L}.safetensors``, each holding::

    W_enc [d_sae, d_model]   b_enc [d_sae]   W_dec [d_sae, d_model]   b_dec [d_model]
    activation_function.threshold [d_sae]    (optional: JumpReLU z * (z > threshold); absent: ReLU)
    W_skip [d_model, d_model]                (optional)

    f = act(F.linear(x, W_enc, b_enc)) = act(x @ W_enc.T + b_enc);  y = f @ W_dec + b_dec (+ x @ W_skip.T)

so native ``W_enc = W_enc.T`` and ``W_skip = W_skip.T`` (transposed views, no copies).

Cross-layer transcoders: ``W_enc_{i}.safetensors`` holding ``W_enc_{i}`` [d_sae, d_model], ``b_enc_{i}``
[d_sae], ``b_dec_{i}`` [d_model], optional ``threshold_{i}`` [d_sae] and optional ``W_skip_{i}``
[d_model, d_model] used as ``x @ W_skip_i`` (NOT transposed, unlike the per-layer file), plus
``W_dec_{i}.safetensors`` holding ``W_dec_{i}`` [d_sae, n_layers - i, d_model] (already the native layout).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..assembly import build_dictionary_set, common_dtype
from ..atomic_output import atomic_directory
from ..config import ActivationConfig, Architecture, DictionaryConfig
from ..dictionary_set import DictionarySet
from ..errors import CircuitscopeError, DictionaryFileError
from ..safetensors_io import read_header, read_tensors, write_tensors
from .format import DictionaryFormat, register
from .native import is_native_directory
from .shapes import check_source_shapes

LAYER_PATTERN = re.compile(r"^layer_(\d+)\.safetensors$")
CLT_PATTERN = re.compile(r"^W_enc_(\d+)\.safetensors$")
THRESHOLD = "activation_function.threshold"
_FIX = "Export the circuit-tracer files again"


def _numbered(path: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    if not path.is_dir():
        return {}
    matches = ((pattern.match(p.name), p) for p in path.iterdir() if p.is_file())
    return {int(m[1]): p for m, p in matches if m is not None}


def is_circuit_tracer_directory(path: str | Path) -> bool:
    path = Path(path)
    return not is_native_directory(path) and bool(_numbered(path, CLT_PATTERN) or _numbered(path, LAYER_PATTERN))


def load_circuit_tracer(path: str | Path, verify_values: bool = True) -> DictionarySet:
    """Load circuit-tracer per-layer transcoders or a CLT (detected from the file names), memory-mapped."""
    path = Path(path)
    clt = _numbered(path, CLT_PATTERN)
    files = clt or _numbered(path, LAYER_PATTERN)
    if not files:
        raise DictionaryFileError(
            path, "no circuit-tracer files (layer_{L}.safetensors, or W_enc_{i} and W_dec_{i}.safetensors) here",
            "Point at the directory that holds them",
        )
    n_layers = max(files) + 1
    missing = [_file_name(i, bool(clt)) for i in range(n_layers) if i not in files]
    if missing:
        raise DictionaryFileError(path, f"missing {', '.join(missing)}", "Copy every layer's file")
    return _load_clt(path, n_layers, verify_values) if clt else _load_per_layer(files, verify_values)


def _file_name(layer: int, clt: bool) -> str:
    return f"W_enc_{layer}.safetensors" if clt else f"layer_{layer}.safetensors"


def _optional(path: Path, optional: dict[str, str], first: dict[str, bool], layer: int) -> list[str]:
    """The optional tensors (``{"threshold": name, "skip": name}``) the file has; every layer must have
    the same ones as layer 0."""
    header = read_header(path)[0]
    present = {kind: name in header for kind, name in optional.items()}
    if layer == 0:
        first.update(present)
    for kind, name in optional.items():
        if present[kind] != first[kind]:
            state = "has" if present[kind] else "lacks"
            raise DictionaryFileError(path, f"{state} tensor {name!r}, unlike layer 0", _FIX)
    return [name for kind, name in optional.items() if present[kind]]


def _load_per_layer(files: dict[int, Path], verify_values: bool) -> DictionarySet:
    layers, paths, first, layer_0 = [], [], {}, None
    for layer in range(len(files)):
        path = files[layer]
        optional = _optional(path, {"threshold": THRESHOLD, "skip": "W_skip"}, first, layer)
        raw = read_tensors(path, ["W_enc", "b_enc", "W_dec", "b_dec", *optional])
        dims = check_source_shapes(path, layer, raw, "W_enc", ("d_sae", "d_model"), {
            "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_model"), "b_dec": ("d_model",), THRESHOLD: ("d_sae",),
            "W_skip": ("d_model", "d_model")}, layer_0, _FIX)
        layer_0 = layer_0 or dims
        tensors = {"W_enc": raw["W_enc"].T, "b_enc": raw["b_enc"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
        if THRESHOLD in raw:
            tensors["threshold"] = raw[THRESHOLD]
        if "W_skip" in raw:
            tensors["W_skip"] = raw["W_skip"].T
        layers.append(tensors)
        paths.append(path)
    sources = [[p] for p in paths]
    return build_dictionary_set(_config("per-layer", first, layers, paths), layers, paths, verify_values, sources)


def _load_clt(path: Path, n_layers: int, verify_values: bool) -> DictionarySet:
    layers, paths, sources, first, layer_0 = [], [], [], {}, None
    for i in range(n_layers):
        enc_path, dec_path = path / f"W_enc_{i}.safetensors", path / f"W_dec_{i}.safetensors"
        if not dec_path.is_file():
            raise DictionaryFileError(dec_path, f"missing: layer {i} has an encoder file but no decoder file", _FIX)
        optional = _optional(enc_path, {"threshold": f"threshold_{i}", "skip": f"W_skip_{i}"}, first, i)
        raw = read_tensors(enc_path, [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", *optional])
        raw |= read_tensors(dec_path, [f"W_dec_{i}"])
        dims = check_source_shapes(enc_path, i, raw, f"W_enc_{i}", ("d_sae", "d_model"), {
            f"b_enc_{i}": ("d_sae",), f"b_dec_{i}": ("d_model",), f"threshold_{i}": ("d_sae",),
            f"W_skip_{i}": ("d_model", "d_model")}, layer_0, _FIX, one_width=True)
        layer_0 = layer_0 or dims
        width, d_model = dims.d_sae, dims.d_model
        if tuple(raw[f"W_dec_{i}"].shape) != (width, n_layers - i, d_model):
            raise DictionaryFileError(
                dec_path, f"tensor 'W_dec_{i}' has shape {list(raw[f'W_dec_{i}'].shape)}, expected "
                f"{[width, n_layers - i, d_model]} (d_sae, the {n_layers - i} layers from {i} on, d_model)", _FIX,
            )
        tensors = {name: raw[f"{name}_{i}"] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        tensors["W_enc"] = tensors["W_enc"].T
        if f"threshold_{i}" in raw:
            tensors["threshold"] = raw[f"threshold_{i}"]
        if f"W_skip_{i}" in raw:
            tensors["W_skip"] = raw[f"W_skip_{i}"]
        layers.append(tensors)
        paths.append(enc_path)
        sources.append([enc_path, dec_path])
    return build_dictionary_set(_config("cross-layer", first, layers, paths), layers, paths, verify_values, sources)


def _config(
    architecture: Architecture, first: dict[str, bool], layers: list[dict[str, torch.Tensor]], paths: list[Path]
) -> DictionaryConfig:
    return DictionaryConfig(
        architecture=architecture, skip="W_skip" in layers[0], n_layers=len(layers),
        d_model=layers[0]["W_enc"].shape[0], widths=[t["W_enc"].shape[1] for t in layers],
        activation=ActivationConfig(type="jumprelu" if first["threshold"] else "relu"),
        dtype=common_dtype(layers, paths), source_format="circuit-tracer",
    )


def save_circuit_tracer(dictionaries: DictionarySet, directory: str | Path, overwrite: bool = False) -> Path:
    """Write JumpReLU or ReLU ``dictionaries`` as circuit-tracer files (atomically)."""
    if dictionaries.config.activation.type not in ("jumprelu", "relu"):
        raise CircuitscopeError(
            f"circuit-tracer files hold JumpReLU or ReLU transcoders; these use "
            f"{dictionaries.config.activation.describe()}. Save them in the native format"
        )
    clt = dictionaries.kind == "clt"
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        for i in range(dictionaries.n_layers):
            t = dictionaries.layer_tensors(i)
            if clt:
                enc = {f"W_enc_{i}": t["W_enc"].T, f"b_enc_{i}": t["b_enc"], f"b_dec_{i}": t["b_dec"]}
                enc |= {f"threshold_{i}": t["threshold"]} if "threshold" in t else {}
                enc |= {f"W_skip_{i}": t["W_skip"]} if "W_skip" in t else {}
                write_tensors(tmp / f"W_enc_{i}.safetensors", enc)
                write_tensors(tmp / f"W_dec_{i}.safetensors", {f"W_dec_{i}": t["W_dec"]})
            else:
                out = {"W_enc": t["W_enc"].T, "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
                out |= {THRESHOLD: t["threshold"]} if "threshold" in t else {}
                out |= {"W_skip": t["W_skip"].T} if "W_skip" in t else {}
                write_tensors(tmp / f"layer_{i}.safetensors", out)
    return Path(directory)


CIRCUIT_TRACER = register(DictionaryFormat(
    name="circuit-tracer", layout="layer_{L}.safetensors, or W_enc_{i}.safetensors + W_dec_{i}.safetensors",
    detect=is_circuit_tracer_directory, load=load_circuit_tracer, save=save_circuit_tracer,
))
