"""Models, hook sites, dictionary modules and their on-disk formats.

The names most code needs are re-exported here; see each module for the rest.
"""

from .assembly import random_dictionary_set
from .config import ActivationConfig, DictionaryConfig
from .cross_layer_transcoder import CrossLayerTranscoder
from .dictionary_set import DictionarySet
from .errors import (
    CircuitscopeError,
    DictionaryFileError,
    DictionaryMismatchError,
    ModelLoadError,
)
from .formats.registry import (
    convert,
    detect_format,
    load_dictionaries,
    save_dictionaries,
)
from .models.hook_sites import MlpRecording, record_mlp_io, replace_mlp_outputs
from .models.loading import LoadedModel, load_model, model_dimensions
from .models.registry import DEFAULT_MODEL, lookup
from .transcoder import Transcoder, TranscoderSet

__all__ = [
    "ActivationConfig", "CircuitscopeError", "CrossLayerTranscoder", "DEFAULT_MODEL", "DictionaryConfig",
    "DictionaryFileError", "DictionaryMismatchError", "DictionarySet", "LoadedModel", "MlpRecording",
    "ModelLoadError", "Transcoder", "TranscoderSet", "convert", "detect_format", "load_dictionaries",
    "load_model", "lookup", "model_dimensions", "random_dictionary_set", "record_mlp_io", "replace_mlp_outputs",
    "save_dictionaries",
]
