"""The native on-disk format: ``config.json`` (a versioned :class:`DictionaryConfig`) plus one
``layer_{L}.safetensors`` per layer holding ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and, where they
apply, ``threshold`` and ``W_skip`` (orientation in :mod:`dictionaries.config`). Tensors are
memory-mapped on load; a save writes a temporary directory and renames it into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError

from ..assembly import build_dictionary_set, cast
from ..atomic_output import atomic_directory, write_text_atomic
from ..config import FORMAT_NAME, FORMAT_VERSION, DictionaryConfig, dtype_name
from ..dictionary_set import DictionarySet
from ..errors import DictionaryFileError
from ..safetensors_io import read_tensors, write_tensors
from .format import DictionaryFormat, format_names, register

CONFIG_FILE = "config.json"


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def is_native_directory(path: str | Path) -> bool:
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def looks_native(path: str | Path) -> bool:
    """A native directory, or one with a damaged config beside ``layer_0.safetensors`` (so that loading it
    says what is wrong with the config instead of reading it as another format)."""
    path = Path(path)
    return is_native_directory(path) or ((path / CONFIG_FILE).is_file() and (path / layer_file(0)).is_file())


def read_config(directory: str | Path) -> DictionaryConfig:
    """The validated config of a native dictionary directory, or one clear DictionaryFileError."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise DictionaryFileError(
            path, "not found: this is not a circuitscope dictionary directory",
            "Convert it first: circuitscope dictionaries convert SRC DST "
            f"--from {'|'.join(name for name in format_names() if name != NATIVE.name)}",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DictionaryFileError(path, f"corrupt JSON ({exc})", "Convert the dictionaries again") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DictionaryFileError(path, f"not a {FORMAT_NAME} config", "Convert the dictionaries again")
    version = raw.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise DictionaryFileError(
            path, f"written by a newer circuitscope (format version {version}; this one reads up to {FORMAT_VERSION})",
            "Upgrade circuitscope: pip install -U circuitscope",
        )
    try:
        return DictionaryConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise DictionaryFileError(path, f"invalid config ({problems})", "Fix the config or convert again") from None


def load_native(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    verify_values: bool = True,
) -> DictionarySet:
    """Load a native dictionary directory. Tensors stay memory-mapped; ``dtype`` and ``device`` say where
    the set computes (converted lazily, see :func:`~dictionaries.assembly.cast`). ``verify_values=False`` skips
    the NaN/inf and threshold checks (the NaN/inf scan reads every weight, once per version of each file)."""
    directory = Path(directory)
    config = read_config(directory)
    paths = [directory / layer_file(layer) for layer in range(config.n_layers)]
    for layer, path in enumerate(paths):
        if not path.is_file():
            raise DictionaryFileError(
                path, f"missing: the config covers {config.n_layers} layers but layer {layer} has no file",
                "Copy the complete directory, or convert the dictionaries again",
            )
    layers = [read_tensors(path) for path in paths]
    return cast(build_dictionary_set(config, layers, paths, verify_values, [[p] for p in paths]), dtype, device)


def save_native(dictionaries: DictionarySet, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``dictionaries`` to ``directory`` in the native format (atomically); returns the directory."""
    config = dictionaries.config.model_copy(update={"dtype": dtype_name(dictionaries.dtype)})
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        for layer in range(config.n_layers):
            write_tensors(
                tmp / layer_file(layer), dictionaries.layer_tensors(layer),
                metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "layer": str(layer)},
            )
        write_text_atomic(tmp / CONFIG_FILE, config.model_dump_json(indent=2) + "\n")
    return Path(directory)


NATIVE = register(DictionaryFormat(
    name="native", layout="config.json + layer_{L}.safetensors", detect=looks_native, load=load_native,
    save=save_native, priority=20,
))
