"""Which format a dictionary directory is in, and one entry point that loads, saves or converts any of them.

The formats are the registered :class:`~dictionaries.formats.format.DictionaryFormat` entries (``native``,
``gemma-scope-2`` and ``circuit-tracer`` register themselves in their modules); this module only loops over
them. Every reader returns the same :class:`~dictionaries.dictionary_set.DictionarySet` in the native layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..assembly import cast
from ..dictionary_set import DictionarySet
from ..errors import CircuitscopeError, DictionaryFileError
from .format import (
    DictionaryFormat,
    format_names,
    get_format,
    normalize_format,
    registered_formats,
    registered_selectors,
)

__all__ = [
    "convert", "detect_format", "format_names", "load_dictionaries", "normalize_format", "save_dictionaries",
]


def detect_format(path: str | Path) -> str | None:
    """The name of the format of the directory at ``path`` (the first registered format, by priority, whose
    ``detect`` accepts it), or None when it is in none of them (or does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return None
    return next((fmt.name for fmt in registered_formats() if fmt.detect(path)), None)


def _resolve(path: Path, format: str | None) -> DictionaryFormat:
    fmt = None if format is None else get_format(format)
    if not path.exists():
        raise DictionaryFileError(path, "does not exist", "Check the path to the dictionaries")
    if fmt is not None:
        return fmt
    detected = detect_format(path)
    if detected is None:
        layouts = ", ".join(f"{fmt.name} ({fmt.layout})" for fmt in registered_formats())
        raise DictionaryFileError(
            path, "is not a dictionary directory of a known format",
            f"Expected one of: {layouts}. Point at such a directory, or name the format",
        )
    return get_format(detected)


def _check_selectors(path: Path, fmt: DictionaryFormat, selectors: dict[str, Any]) -> dict[str, Any]:
    """The selectors that were given (not None); CircuitscopeError for a name no format knows, or one that
    ``fmt`` does not take."""
    known = [s.name for s in registered_selectors()]
    unknown = sorted(set(selectors) - set(known))
    if unknown:
        raise CircuitscopeError(
            f"unknown selector(s) {', '.join(unknown)}; the selectors are {', '.join(known) or 'none'}"
        )
    given = {name: value for name, value in selectors.items() if value is not None}
    foreign = [name for name in given if name not in fmt.selector_names]
    if foreign:
        owners = [other.variants for other in registered_formats() if set(foreign) & set(other.selector_names)]
        raise CircuitscopeError(
            f"{', '.join(foreign)} select {' or '.join(owners)}; {path} is in the {fmt.name} format"
        )
    return given


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

    Tensors stay memory-mapped; ``dtype`` and ``device`` say where the set computes, and weights are converted
    slice by slice as they are used (:func:`~dictionaries.assembly.cast`). ``selectors``
    (Gemma Scope 2: ``width``, ``l0``, ``affine``) pick among several variants of one layer in a directory.
    """
    path = Path(path)
    fmt = _resolve(path, format)
    given = _check_selectors(path, fmt, selectors)
    return cast(fmt.load(path, verify_values=verify_values, **given), dtype, device)


def save_dictionaries(
    dictionaries: DictionarySet, directory: str | Path, format: str = "native", overwrite: bool = False
) -> Path:
    """Write ``dictionaries`` to ``directory`` in ``format`` (atomically); returns the directory."""
    return get_format(format).save(dictionaries, Path(directory), overwrite=overwrite)


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
    get_format(to_format)  # an unknown target fails before anything is read
    dictionaries = load_dictionaries(src, from_format, verify_values=verify_values, **selectors)
    save_dictionaries(dictionaries, dst, to_format, overwrite=overwrite)
    return dictionaries
