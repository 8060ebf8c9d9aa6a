"""On-disk dictionary formats: one module per format, one registry that loads, saves and converts them.

See :mod:`dictionaries.formats.registry` and docs/design.md ("A new format").
"""

from .registry import convert, detect_format, load_dictionaries, save_dictionaries

__all__ = ["convert", "detect_format", "load_dictionaries", "save_dictionaries"]
