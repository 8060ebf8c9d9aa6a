"""Dictionary sets shipped inside the package, so that ``circuitscope trace PROMPT`` works offline with no flags.

The model registry names, per model size and variant, the folder under ``dictionaries/bundled_sets/`` that
holds its set in the native format (``ModelSize.bundled_dictionaries``). Today that is the skip-transcoder
set for Gemma 3 270M (pt) that ``tools/build_default_dictionaries.sh`` trains; how it was made and how good it
is (FVU, L0, dead features, CE increase per layer) is written in the README.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CircuitscopeError
from .models.registry import lookup

BUNDLED_ROOT = Path(__file__).resolve().parent / "bundled_sets"


def default_dictionaries_path(model: str) -> Path:
    """The folder of the set shipped for ``model`` (a registry name or official hub id; a checkpoint directory
    gets none: its weights may differ). CircuitscopeError when none is shipped or it is missing."""
    entry = lookup(model)
    folder = entry.bundled_dictionaries if entry is not None else None
    if folder is None:
        raise CircuitscopeError(
            f"no dictionaries are shipped for {model}; pass --dictionaries DIR (a native, Gemma Scope 2 or "
            "circuit-tracer set, or a hub id with subfolder such as google/gemma-scope-2-1b-pt/transcoder_all)"
        )
    path = BUNDLED_ROOT / folder
    if not (path / "config.json").is_file():
        raise CircuitscopeError(
            f"the dictionaries shipped for {model} are missing from {path}: the installation is incomplete; "
            "reinstall circuitscope, or pass --dictionaries DIR"
        )
    return path
