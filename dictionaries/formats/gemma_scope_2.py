"""Gemma Scope 2 transcoders (Google DeepMind): read into the native layout, and write back bit-exact.

Per-layer transcoders: a directory (a repository root holding ``transcoder_all/``, or that folder itself)
with one folder per layer, ``layer_{L}_width_{W}_l0_{X}`` or ``layer_{L}_width_{W}_l0_{X}_affine``
(W like ``16k``, ``262k``; X like ``small`` or a number), each holding ``params.safetensors``::

    w_enc [d_model, d_sae]  b_enc [d_sae]  threshold [d_sae]  w_dec [d_sae, d_model]  b_dec [d_model]
    affine_skip_connection [d_model, d_model]                   (``_affine`` folders only)

    z = x @ w_enc + b_enc;  f = relu(z) * (z > threshold);  y = f @ w_dec + b_dec (+ x @ affine_skip_connection)

That is the native orientation already, so tensors are renamed, never transposed (``W_skip`` is
``affine_skip_connection``). The chosen folder names are kept in the config's metadata under
:data:`FOLDERS_KEY`, so that a save restores them.

Cross-layer transcoders: ``params_layer_{i}.safetensors`` for every layer i, with the same tensors except
``w_dec`` [d_sae, n_layers, d_model], the decoders of source i to EVERY layer. The native CLT keeps targets
t >= i (``W_dec = w_dec[:, i:, :]``, a view). Entries for t < i cannot act in a causal forward pass: they
are ignored (with a warning when non-zero) and a save writes zeros there.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..assembly import build_dictionary_set, common_dtype
from ..atomic_output import atomic_directory
from ..config import ActivationConfig, DictionaryConfig
from ..dictionary_set import DictionarySet
from ..errors import CircuitscopeError, DictionaryFileError
from ..safetensors_io import read_header, read_tensors, write_tensors
from ..verified_files import scan_once
from .format import DictionaryFormat, Selector, register
from .shapes import Dim, SourceDims, check_source_shapes

TRANSCODER_DIR = "transcoder_all"
PARAMS_FILE = "params.safetensors"
FOLDERS_KEY = "gemma_scope_2.folders"
SKIP = "affine_skip_connection"
FOLDER_PATTERN = re.compile(r"^layer_(\d+)_width_(\d+[km]?)_l0_([A-Za-z0-9.]+?)(_affine)?$")
CLT_PATTERN = re.compile(r"^params_layer_(\d+)\.safetensors$")
_REQUIRED = ["w_enc", "b_enc", "threshold", "w_dec", "b_dec"]
_NATIVE_NAMES = {
    "w_enc": "W_enc", "b_enc": "b_enc", "threshold": "threshold", "w_dec": "W_dec", "b_dec": "b_dec", SKIP: "W_skip",
}
_REDOWNLOAD = "Download the Gemma Scope 2 files again"
WIDTH = Selector("width", "Gemma Scope 2: width folder label to pick, e.g. 16k.")
L0 = Selector("l0", "Gemma Scope 2: l0 folder label to pick, e.g. small.")
AFFINE = Selector("affine", "Gemma Scope 2: pick the affine (skip) folders or not.", is_flag=True)


@dataclass(frozen=True)
class LayerFolder:
    """One ``layer_{L}_width_{W}_l0_{X}[_affine]`` folder."""

    name: str
    layer: int
    width: str
    l0: str
    affine: bool

    @classmethod
    def parse(cls, name: str) -> LayerFolder | None:
        match = FOLDER_PATTERN.match(name)
        if match is None:
            return None
        return cls(name, int(match[1]), match[2], match[3], match[4] is not None)

    @property
    def cli_args(self) -> str:
        """The command-line selectors that choose this folder's variant: ``--width 16k --l0 small --affine``."""
        return " ".join(s.cli_args(v) for s, v in ((WIDTH, self.width), (L0, self.l0), (AFFINE, self.affine)))


def width_token(width: int) -> str:
    """Gemma Scope's name for a width: 4096 -> ``4k``, 16384 -> ``16k``, 262144 -> ``262k``, 2**20 -> ``1m``."""
    if width >= 1_000_000:
        return f"{width // 1_000_000}m"
    return f"{width // 1000}k" if width >= 1000 else str(width)


def transcoder_root(path: str | Path) -> Path:
    """``path/transcoder_all`` when ``path`` is a repository root holding it, else ``path``."""
    path = Path(path)
    return path / TRANSCODER_DIR if (path / TRANSCODER_DIR).is_dir() else path


def list_layer_folders(path: str | Path) -> list[LayerFolder]:
    root = transcoder_root(path)
    if not root.is_dir():
        return []
    folders = (LayerFolder.parse(p.name) for p in root.iterdir() if p.is_dir())
    return sorted((f for f in folders if f is not None), key=lambda f: (f.layer, f.name))


def list_clt_files(path: str | Path) -> dict[int, Path]:
    path = Path(path)
    if not path.is_dir():
        return {}
    matches = ((CLT_PATTERN.match(p.name), p) for p in path.iterdir() if p.is_file())
    return {int(m[1]): p for m, p in matches if m is not None}


def is_gemma_scope_2_directory(path: str | Path) -> bool:
    return bool(list_clt_files(path)) or bool(list_layer_folders(path))


def select_folders(
    path: str | Path, width: str | int | None = None, l0: str | int | None = None, affine: bool | None = None
) -> list[LayerFolder]:
    """One folder per layer 0..n-1, picked by the selectors; DictionaryFileError for a gap or an ambiguity."""
    root = transcoder_root(path)
    folders = list_layer_folders(root)
    if not folders:
        raise DictionaryFileError(
            root, "no Gemma Scope 2 transcoder folders (layer_{L}_width_{W}_l0_{X}[_affine]) here",
            "Point at the repository root or its transcoder_all/ folder",
        )
    width = width_token(width) if isinstance(width, int) else width
    by_layer: dict[int, list[LayerFolder]] = {}
    for folder in folders:
        by_layer.setdefault(folder.layer, []).append(folder)
    missing = [layer for layer in range(max(by_layer) + 1) if layer not in by_layer]
    if missing:
        raise DictionaryFileError(
            root, f"no folder for layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
            f"(found layers {sorted(by_layer)})",
            "Download the transcoders of every layer",
        )
    chosen = []
    for layer, options in sorted(by_layer.items()):
        matches = [
            f for f in options
            if (width is None or f.width == width) and (l0 is None or f.l0 == str(l0))
            and (affine is None or f.affine == affine)
        ]
        if len(matches) != 1:
            wanted = f"width={width!r}, l0={l0!r}, affine={affine!r}"
            how = "no folder matches" if not matches else "several folders match"
            variants = " or ".join(f"'{f.cli_args}'" for f in matches or options)
            raise DictionaryFileError(
                root, f"layer {layer}: {how} {wanted}; available: {', '.join(f.name for f in options)}",
                f"Choose one variant with the width=, l0= and affine= selectors; on the command line: {variants}",
            )
        chosen.append(matches[0])
    if len({f.affine for f in chosen}) > 1:
        raise DictionaryFileError(
            root, "some chosen layers have an affine skip connection and some do not "
            f"({', '.join(f.name for f in chosen)})",
            "Pass affine=True or affine=False (on the command line: --affine or --no-affine)",
        )
    return chosen


def load_gemma_scope_2(
    path: str | Path,
    *,
    width: str | int | None = None,
    l0: str | int | None = None,
    affine: bool | None = None,
    verify_values: bool = True,
) -> DictionarySet:
    """Load Gemma Scope 2 per-layer transcoders or a CLT (detected from the files), memory-mapped."""
    path = Path(path)
    if not path.is_dir():
        raise DictionaryFileError(path, "not a directory", "Point at a downloaded Gemma Scope 2 directory")
    clt_files = list_clt_files(path)
    if clt_files and not list_layer_folders(path):
        if width is not None or l0 is not None or affine is not None:
            raise CircuitscopeError(f"{path} holds one cross-layer transcoder: width=, l0= and affine= do not apply")
        return _load_clt(path, clt_files, verify_values)
    return _load_per_layer(path, select_folders(path, width, l0, affine), verify_values)


def _check_source(
    path: Path, layer: int, raw: dict[str, torch.Tensor], first: SourceDims | None, n_dec: int | None
) -> SourceDims:
    """Check shapes in the file's own names and orientation against layer 0's ``first`` (``n_dec``: a CLT's
    w_dec targets, and its one width); returns the layer's sizes."""
    w_dec: tuple[Dim, ...] = ("d_sae", "d_model") if n_dec is None else ("d_sae", n_dec, "d_model")
    expected: dict[str, tuple[Dim, ...]] = {
        "b_enc": ("d_sae",), "threshold": ("d_sae",), "w_dec": w_dec, "b_dec": ("d_model",),
        SKIP: ("d_model", "d_model"),
    }
    return check_source_shapes(
        path, layer, raw, "w_enc", ("d_model", "d_sae"), expected, first, _REDOWNLOAD, one_width=n_dec is not None
    )


def _build(
    layers: list[dict[str, torch.Tensor]], paths: list[Path], clt: bool, skip: bool, verify_values: bool,
    metadata: dict[str, str],
) -> DictionarySet:
    dtype = common_dtype(layers, paths)
    config = DictionaryConfig(
        architecture="cross-layer" if clt else "per-layer", skip=skip, n_layers=len(layers),
        d_model=layers[0]["W_enc"].shape[0], widths=[t["W_enc"].shape[1] for t in layers],
        activation=ActivationConfig(type="jumprelu"), dtype=dtype, source_format="gemma-scope-2", metadata=metadata,
    )
    return build_dictionary_set(config, layers, paths, verify_values, [[p] for p in paths])


def _load_per_layer(path: Path, chosen: list[LayerFolder], verify_values: bool) -> DictionarySet:
    root = transcoder_root(path)
    layers, paths, first = [], [], None
    for folder in chosen:
        file = root / folder.name / PARAMS_FILE
        if not file.is_file():
            raise DictionaryFileError(file, "missing", f"Download {folder.name}/{PARAMS_FILE} again")
        header, _, _ = read_header(file)
        if SKIP in header and not folder.affine:
            raise DictionaryFileError(file, f"has {SKIP} but its folder name has no _affine suffix", _REDOWNLOAD)
        raw = read_tensors(file, _REQUIRED + ([SKIP] if folder.affine else []))
        dims = _check_source(file, folder.layer, raw, first, None)
        first = first or dims
        layers.append({_NATIVE_NAMES[name]: tensor for name, tensor in raw.items()})
        paths.append(file)
    folders = json.dumps([f.name for f in chosen])
    return _build(layers, paths, False, chosen[0].affine, verify_values, {FOLDERS_KEY: folders})


EARLIER_DECODERS_CHECK = "clt-earlier-decoders-v1"  # a CLT file's w_dec to layers before its source: non-zero?


def _any_nonzero(tensor: torch.Tensor, rows: int = 4096) -> bool:
    """Whether any entry is non-zero, scanning ``rows`` rows of dim 0 at a time (bounded memory)."""
    return any(bool(tensor[i : i + rows].ne(0).any()) for i in range(0, tensor.shape[0], rows))


def _load_clt(path: Path, files: dict[int, Path], verify_values: bool) -> DictionarySet:
    n_layers = max(files) + 1
    missing = [f"params_layer_{i}.safetensors" for i in range(n_layers) if i not in files]
    if missing:
        raise DictionaryFileError(path, f"missing {', '.join(missing)}", "Download every layer's file of the CLT")
    skip = SKIP in read_header(files[0])[0]
    layers, paths, first, earlier = [], [], None, []
    for i in range(n_layers):
        file = files[i]
        if (SKIP in read_header(file)[0]) != skip:
            state = "lacks" if skip else "has"
            raise DictionaryFileError(file, f"{state} {SKIP}, unlike params_layer_0.safetensors", _REDOWNLOAD)
        raw = read_tensors(file, _REQUIRED + ([SKIP] if skip else []))
        w_dec = raw["w_dec"]
        if w_dec.ndim == 3 and w_dec.shape[1] > n_layers:
            raise DictionaryFileError(
                path, f"{file.name}'s w_dec decodes to {w_dec.shape[1]} layers but only {n_layers} layer files are "
                "here",
                f"Download params_layer_{n_layers}.safetensors to params_layer_{w_dec.shape[1] - 1}.safetensors too",
            )
        dims = _check_source(file, i, raw, first, n_layers)
        first = first or dims
        if verify_values and i > 0 and scan_once(EARLIER_DECODERS_CHECK, {"w_dec": w_dec}, [file],
                                                 lambda w_dec=w_dec, i=i: _any_nonzero(w_dec[:, :i, :])):
            earlier.append(file.name)
        tensors = {_NATIVE_NAMES[name]: tensor for name, tensor in raw.items()}
        tensors["W_dec"] = w_dec[:, i:, :]
        layers.append(tensors)
        paths.append(file)
    if earlier:
        warnings.warn(
            f"{path}: w_dec in {', '.join(earlier)} has non-zero decoders to layers before the source layer; "
            "they cannot act in a causal forward pass and are ignored (a save writes zeros there)", stacklevel=3,
        )
    return _build(layers, paths, True, skip, verify_values, {})


def folder_names(dictionaries: DictionarySet) -> list[str]:
    """The per-layer folder names a save uses: the loaded ones from the metadata when they still fit (layer and
    skip, and width unless the set was loaded from Gemma Scope 2), else ``layer_{L}_width_{W}_l0_custom[_affine]``."""
    skip, widths = dictionaries.has_skip, dictionaries.widths
    suffix = "_affine" if skip else ""
    generated = [f"layer_{L}_width_{width_token(w)}_l0_custom{suffix}" for L, w in enumerate(widths)]
    try:
        stored = json.loads(str(dictionaries.config.metadata.get(FOLDERS_KEY)))
    except ValueError:
        return generated
    if not isinstance(stored, list) or len(stored) != len(widths):
        return generated
    for layer, (name, width) in enumerate(zip(stored, widths, strict=True)):
        folder = LayerFolder.parse(name) if isinstance(name, str) else None
        if folder is None or (folder.layer, folder.affine) != (layer, skip) or (
            folder.width != width_token(width) and dictionaries.config.source_format != "gemma-scope-2"
        ):
            return generated
    return stored


def _threshold(dictionaries: DictionarySet, layer: int) -> torch.Tensor:
    activation = dictionaries.config.activation
    if activation.type == "jumprelu":
        return dictionaries.layer_tensors(layer)["threshold"]
    if activation.type == "relu":  # relu(z) * (z > 0) == relu(z)
        return torch.zeros(dictionaries.widths[layer], dtype=dictionaries.dtype)
    raise CircuitscopeError(
        f"Gemma Scope 2 stores JumpReLU transcoders only; these use {activation.describe()}. "
        "Save them in the native format, or calibrate a JumpReLU threshold first (BatchTopK.to_jumprelu)"
    )


def gemma_scope_2_tensors(dictionaries: DictionarySet, layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer`` in Gemma Scope 2 names; a CLT's ``w_dec`` [d_sae, n_layers, d_model] has zeros for t < layer."""
    native = dictionaries.layer_tensors(layer)
    out = {"w_enc": native["W_enc"], "b_enc": native["b_enc"], "threshold": _threshold(dictionaries, layer),
           "w_dec": native["W_dec"], "b_dec": native["b_dec"]}
    if dictionaries.kind == "clt":
        w_dec = native["W_dec"].new_zeros(native["W_dec"].shape[0], dictionaries.n_layers, dictionaries.d_model)
        w_dec[:, layer:, :] = native["W_dec"]
        out["w_dec"] = w_dec
    if "W_skip" in native:
        out[SKIP] = native["W_skip"]
    return out


def save_gemma_scope_2(dictionaries: DictionarySet, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``dictionaries`` in the Gemma Scope 2 layout (atomically): per-layer sets to
    ``transcoder_all/<folder>/params.safetensors``, CLTs to ``params_layer_{i}.safetensors``."""
    _threshold(dictionaries, 0)  # refuse TopK before anything is written
    folders = None if dictionaries.kind == "clt" else folder_names(dictionaries)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        for layer in range(dictionaries.n_layers):
            target = tmp / f"params_layer_{layer}.safetensors" if folders is None else (
                tmp / TRANSCODER_DIR / folders[layer] / PARAMS_FILE)
            write_tensors(target, gemma_scope_2_tensors(dictionaries, layer))
    return Path(directory)


GEMMA_SCOPE_2 = register(DictionaryFormat(
    name="gemma-scope-2",
    layout="transcoder_all/layer_{L}_width_{W}_l0_{X}[_affine]/params.safetensors, or params_layer_{i}.safetensors",
    detect=is_gemma_scope_2_directory, load=load_gemma_scope_2, save=save_gemma_scope_2,
    selectors=(WIDTH, L0, AFFINE), variants="Gemma Scope 2 folders", priority=10,
))
