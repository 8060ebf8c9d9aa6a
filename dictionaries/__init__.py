"""Models, hook sites, dictionary modules and their on-disk formats.

The names most code needs are re-exported here, imported on first use (PEP 562): ``import dictionaries.errors``
must not import torch, so that reading a graph file or printing ``--help`` starts fast. See each module for
the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "random_dictionary_set": ".assembly",
    "ActivationConfig": ".config", "DictionaryConfig": ".config",
    "CrossLayerTranscoder": ".cross_layer_transcoder",
    "DictionarySet": ".dictionary_set",
    "CircuitscopeError": ".errors", "DictionaryFileError": ".errors", "DictionaryMismatchError": ".errors",
    "ModelLoadError": ".errors",
    "convert": ".formats.registry", "detect_format": ".formats.registry", "load_dictionaries": ".formats.registry",
    "save_dictionaries": ".formats.registry",
    "MlpRecording": ".models.hook_sites", "record_mlp_io": ".models.hook_sites",
    "replace_mlp_outputs": ".models.hook_sites",
    "LoadedModel": ".models.loading", "load_model": ".models.loading", "model_dimensions": ".models.loading",
    "DEFAULT_MODEL": ".models.registry", "lookup": ".models.registry",
    "Transcoder": ".transcoder", "TranscoderSet": ".transcoder",
}
__all__ = [
    "ActivationConfig", "CircuitscopeError", "CrossLayerTranscoder", "DEFAULT_MODEL", "DictionaryConfig",
    "DictionaryFileError", "DictionaryMismatchError", "DictionarySet", "LoadedModel", "MlpRecording",
    "ModelLoadError", "Transcoder", "TranscoderSet", "convert", "detect_format", "load_dictionaries",
    "load_model", "lookup", "model_dimensions", "random_dictionary_set", "record_mlp_io", "replace_mlp_outputs",
    "save_dictionaries",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .assembly import random_dictionary_set
    from .config import ActivationConfig, DictionaryConfig
    from .cross_layer_transcoder import CrossLayerTranscoder
    from .dictionary_set import DictionarySet
    from .errors import CircuitscopeError, DictionaryFileError, DictionaryMismatchError, ModelLoadError
    from .formats.registry import convert, detect_format, load_dictionaries, save_dictionaries
    from .models.hook_sites import MlpRecording, record_mlp_io, replace_mlp_outputs
    from .models.loading import LoadedModel, load_model, model_dimensions
    from .models.registry import DEFAULT_MODEL, lookup
    from .transcoder import Transcoder, TranscoderSet
