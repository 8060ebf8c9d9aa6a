"""Which format a dictionary directory is in, and one entry point that loads, saves or converts any of them.

Formats: ``native`` (:mod:`dictionaries.formats.native`), ``gemma-scope-2``
(:mod:`dictionaries.formats.gemma_scope_2`) and ``circuit-tracer`` (:mod:`dictionaries.formats.circuit_tracer`).
Every reader returns the same :class:`~dictionaries.dictionary_set.DictionarySet` in the native layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from ..config import dtype_name
from ..dictionary_set import DictionarySet
from ..errors import CircuitscopeError, DictionaryFileError
from .circuit_tracer import (
    is_circuit_tracer_directory,
    load_circuit_tracer,
    save_circuit_tracer,
)
from .gemma_scope_2 import (
    is_gemma_scope_2_directory,
    load_gemma_scope_2,
    save_gemma_scope_2,
)
from .native import (
    CONFIG_FILE,
    is_native_directory,
    layer_file,
    load_native,
    save_native,
)

FormatName = Literal["native", "gemma-scope-2", "circuit-tracer"]
FORMATS: tuple[FormatName, ...] = ("native", "gemma-scope-2", "circuit-tracer")
SELECTORS = ("width", "l0", "affine")  # Gemma Scope 2 only
_LAYOUTS = (
    "native (config.json + layer_{L}.safetensors), "
    "gemma-scope-2 (transcoder_all/layer_{L}_width_{W}_l0_{X}[_affine]/params.safetensors, "
    "or params_layer_{i}.safetensors), "
    "circuit-tracer (layer_{L}.safetensors, or W_enc_{i}.safetensors + W_dec_{i}.safetensors)"
)


def normalize_format(name: str) -> FormatName:
    """``"gemma_scope_2"``, ``"Gemma-Scope-2"`` -> ``"gemma-scope-2"``; CircuitscopeError for an unknown name."""
    canonical = name.strip().lower().replace("_", "-")
    if canonical not in FORMATS:
        raise CircuitscopeError(f"unknown dictionary format {name!r}; choose one of {', '.join(FORMATS)}")
    return canonical  # type: ignore[return-value]


def detect_format(path: str | Path) -> FormatName | None:
    """The format of the directory at ``path``, or None when it is none of them (or does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if is_native_directory(path) or ((path / CONFIG_FILE).is_file() and (path / layer_file(0)).is_file()):
        return "native"  # a damaged native config still reads as native, so its error says what is wrong
    if is_gemma_scope_2_directory(path):
        return "gemma-scope-2"
    if is_circuit_tracer_directory(path):
        return "circuit-tracer"
    return None


def _resolve(path: Path, format: str | None) -> FormatName:
    fmt = None if format is None else normalize_format(format)
    if not path.exists():
        raise DictionaryFileError(path, "does not exist", "Check the path to the dictionaries")
    if fmt is not None:
        return fmt
    detected = detect_format(path)
    if detected is None:
        raise DictionaryFileError(
            path, "is not a dictionary directory of a known format",
            f"Expected one of: {_LAYOUTS}. Point at such a directory, or name the format",
        )
    return detected


def load_dictionaries(
    path: str | Path,
    format: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    verify_values: bool = True,
    **selectors: Any,
) -> DictionarySet:
    """Load the dictionaries at ``path`` in ``format`` (detected when None) into the native layout.

    Tensors stay memory-mapped unless ``dtype`` or ``device`` asks for a conversion. ``selectors``
    (``width``, ``l0``, ``affine``) pick among several Gemma Scope 2 folders of one layer.
    """
    path = Path(path)
    fmt = _resolve(path, format)
    unknown = sorted(set(selectors) - set(SELECTORS))
    if unknown:
        raise CircuitscopeError(f"unknown selector(s) {', '.join(unknown)}; the selectors are {', '.join(SELECTORS)}")
    given = {k: v for k, v in selectors.items() if v is not None}
    if given and fmt != "gemma-scope-2":
        raise CircuitscopeError(f"{', '.join(given)} select Gemma Scope 2 folders; {path} is in the {fmt} format")
    if fmt == "native":
        return load_native(path, dtype=dtype, device=device, verify_values=verify_values)
    if fmt == "gemma-scope-2":
        dictionaries = load_gemma_scope_2(path, verify_values=verify_values, **given)
    else:
        dictionaries = load_circuit_tracer(path, verify_values=verify_values)
    if dtype is not None and dtype != dictionaries.dtype:
        dictionaries.config.dtype = dtype_name(dtype)
    if dtype is not None or device is not None:
        dictionaries = dictionaries.to(device=device, dtype=dtype)
    return dictionaries


def save_dictionaries(
    dictionaries: DictionarySet, directory: str | Path, format: str = "native", overwrite: bool = False
) -> Path:
    """Write ``dictionaries`` to ``directory`` in ``format`` (atomically); returns the directory."""
    fmt = normalize_format(format)
    if fmt == "native":
        return save_native(dictionaries, directory, overwrite=overwrite)
    if fmt == "gemma-scope-2":
        return save_gemma_scope_2(dictionaries, directory, overwrite=overwrite)
    return save_circuit_tracer(dictionaries, directory, overwrite=overwrite)


def convert(
    src: str | Path,
    dst: str | Path,
    from_format: str | None = None,
    overwrite: bool = False,
    *,
    to_format: str = "native",
    verify_values: bool = True,
    **selectors: Any,
) -> DictionarySet:
    """Load ``src`` (``from_format``, detected when None) and write it to ``dst`` in ``to_format``
    (native by default); returns the loaded set."""
    dictionaries = load_dictionaries(src, from_format, verify_values=verify_values, **selectors)
    save_dictionaries(dictionaries, dst, to_format, overwrite=overwrite)
    return dictionaries
