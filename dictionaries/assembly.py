"""From per-layer tensors in native naming to a validated dictionary set, and random sets for tests.

Every reader (native, Gemma Scope 2, circuit-tracer) renames and reorients its tensors into the
native layout first and then calls :func:`build_dictionary_set`, so shape, NaN and threshold checks,
with their messages, live here once (:func:`check_shape` also words the readers' checks of their own
files, see :mod:`dictionaries.formats.shapes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .config import ActivationConfig, Architecture, DictionaryConfig, DType, dtype_name
from .cross_layer_transcoder import CrossLayerTranscoder
from .dictionary_set import DictionarySet
from .errors import DictionaryFileError
from .transcoder import TranscoderSet
from .verified_files import check_finite_once

_FIX_SHAPE = "The file does not match its config; convert the dictionaries again"


def expected_shapes(config: DictionaryConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """The native tensors of ``layer`` and their shapes under ``config``."""
    d, w = config.d_model, config.widths[layer]
    dec = (w, d) if config.architecture == "per-layer" else (w, config.n_layers - layer, d)
    shapes = {"W_enc": (d, w), "b_enc": (w,), "W_dec": dec, "b_dec": (d,)}
    if config.activation.type == "jumprelu":
        shapes["threshold"] = (w,)
    if config.skip:
        shapes["W_skip"] = (d, d)
    return shapes


def check_shape(
    path: str | Path, layer: int, name: str, tensor: torch.Tensor, shape: Sequence[int], fix: str, note: str = ""
) -> None:
    """Raise DictionaryFileError (naming ``path``, ending in ``note`` then ``fix``) when ``tensor``, layer
    ``layer``'s ``name``, does not have ``shape``. Every reader's shape message is this one."""
    if tuple(tensor.shape) != tuple(shape):
        raise DictionaryFileError(
            path, f"tensor {name!r} of layer {layer} has shape {list(tensor.shape)}, expected {list(shape)}{note}", fix
        )


def validate_layer_tensors(
    config: DictionaryConfig, layer: int, tensors: dict[str, torch.Tensor], path: str | Path,
    verify_values: bool = True, sources: Sequence[str | Path] = (),
) -> None:
    """Raise DictionaryFileError (naming ``path``) for a missing, extra or misshapen tensor, a NaN or inf,
    or a negative JumpReLU threshold.

    ``sources``: the files the tensors are memory-mapped from. When given, the NaN/inf scan runs once per
    version of those files (:mod:`dictionaries.verified_files`); the threshold check (at most [d_sae]) always runs."""
    shapes = expected_shapes(config, layer)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise DictionaryFileError(path, f"layer {layer} lacks tensor(s) {', '.join(missing)}", _FIX_SHAPE)
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise DictionaryFileError(path, f"layer {layer} has unexpected tensor(s) {', '.join(extra)}", _FIX_SHAPE)
    for name, shape in shapes.items():
        tensor = tensors[name]
        check_shape(path, layer, name, tensor, shape, _FIX_SHAPE)
        if not tensor.is_floating_point():
            raise DictionaryFileError(path, f"tensor {name!r} has integer dtype {tensor.dtype}", _FIX_SHAPE)
    if verify_values:
        check_finite_once(path, tensors, sources)
        threshold = tensors.get("threshold")
        if threshold is not None and bool((threshold < 0).any()):
            raise DictionaryFileError(
                path,
                f"layer {layer} has negative JumpReLU thresholds (min {threshold.min().item():.4g})",
                "Thresholds must be >= 0; the file is corrupt or not a JumpReLU dictionary",
            )


def common_dtype(layers: Sequence[dict[str, torch.Tensor]], paths: Sequence[str | Path]) -> DType:
    """The dtype every tensor of every layer shares (the native format has one), or DictionaryFileError."""
    first = next(iter(layers[0].values())).dtype
    for tensors, path in zip(layers, paths, strict=True):
        for name, tensor in tensors.items():
            if tensor.dtype != first:
                raise DictionaryFileError(
                    path, f"tensor {name!r} is {tensor.dtype} but layer 0's tensors are {first}",
                    "Store every tensor in one dtype (convert the files)",
                )
    try:
        return dtype_name(first)
    except ValueError as exc:
        raise DictionaryFileError(paths[0], str(exc), "Convert the files to float32 or bfloat16") from None


def build_dictionary_set(
    config: DictionaryConfig,
    layers: Sequence[dict[str, torch.Tensor]],
    paths: Sequence[str | Path],
    verify_values: bool = True,
    sources: Sequence[Sequence[str | Path]] | None = None,
) -> DictionarySet:
    """Validate every layer's tensors (``paths[L]`` names layer L's file in messages) and build the set.

    ``sources`` (readers of files): per layer, the files its tensors are memory-mapped from, so that the NaN/inf
    scan of an unchanged file is not repeated (see :func:`validate_layer_tensors`); None: scan every time."""
    sources = sources or [()] * len(layers)
    for layer, (tensors, path, files) in enumerate(zip(layers, paths, sources, strict=True)):
        validate_layer_tensors(config, layer, tensors, path, verify_values, files)
    dtype = common_dtype(layers, paths)
    if dtype != config.dtype:
        raise DictionaryFileError(paths[0], f"the config says {config.dtype} but the tensors are {dtype}", _FIX_SHAPE)
    if config.architecture == "per-layer":
        return TranscoderSet.from_layer_tensors(config, layers)
    return CrossLayerTranscoder.from_layer_tensors(config, layers)


def cast(
    dictionaries: DictionarySet, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> DictionarySet:
    """``dictionaries`` computing in ``dtype`` on ``device`` (None: as they are), its config's dtype updated.

    Lazy: only the vectors (biases, thresholds) are converted; the matrices stay memory-mapped as stored and each
    computation converts the slices it reads (:meth:`DictionarySet.compute_in`; ``materialize()`` converts them
    whole)."""
    if dtype is not None and dtype != dictionaries.dtype:
        dictionaries.config.dtype = dtype_name(dtype)
    if dtype is not None or device is not None:
        dictionaries.compute_in(dtype, device)
    return dictionaries


def random_dictionary_set(
    n_layers: int,
    d_model: int,
    width: int,
    architecture: Architecture = "per-layer",
    activation: ActivationConfig | None = None,
    skip: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    model: str | None = None,
) -> DictionarySet:
    """Random weights (tests, benchmarks, a training start): unit-norm decoder rows (divided by
    sqrt(n_targets) for a CLT), encoder = decoder transpose for per-layer sets, zero biases,
    JumpReLU thresholds at zero, skip weights ~ N(0, 1/d_model)."""
    activation = activation or ActivationConfig(type="jumprelu")
    config = DictionaryConfig(
        architecture=architecture, skip=skip, n_layers=n_layers, d_model=d_model, widths=[width] * n_layers,
        activation=activation, dtype=dtype_name(dtype), model=model, source_format="trained",
    )
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for layer in range(n_layers):
        n_targets = 1 if architecture == "per-layer" else n_layers - layer
        W_dec = torch.randn(width, n_targets, d_model, generator=gen)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) / n_targets**0.5
        tensors = {
            "W_enc": W_dec[:, 0, :].T.contiguous() * n_targets**0.5,
            "b_enc": torch.zeros(width),
            "W_dec": W_dec[:, 0, :].contiguous() if architecture == "per-layer" else W_dec,
            "b_dec": torch.zeros(d_model),
        }
        if activation.type == "jumprelu":
            tensors["threshold"] = torch.zeros(width)
        if skip:
            tensors["W_skip"] = torch.randn(d_model, d_model, generator=gen) / d_model**0.5
        layers.append({k: v.to(dtype) for k, v in tensors.items()})
    return build_dictionary_set(config, layers, [f"<random layer {i}>" for i in range(n_layers)])
