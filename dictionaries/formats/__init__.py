"""On-disk dictionary formats: one module per format, each registering a
:class:`~dictionaries.formats.format.DictionaryFormat`, and one registry that loads, saves and converts them.

A new format is a new module that ends in ``register(DictionaryFormat(...))``, plus its import below
(the import is what registers it). See :mod:`dictionaries.formats.format`.
"""

from . import circuit_tracer, gemma_scope_2, native  # noqa: F401  (importing a format module registers it)
from .format import (
    DictionaryFormat,
    Selector,
    format_names,
    register,
    registered,
    registered_selectors,
    unregister,
)
from .registry import convert, detect_format, load_dictionaries, save_dictionaries

__all__ = [
    "DictionaryFormat", "Selector", "convert", "detect_format", "format_names", "load_dictionaries", "register",
    "registered", "registered_selectors", "save_dictionaries", "unregister",
]
