"""The model and dictionary set a command works on, loaded the same way by every command that runs them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily at run time: `circuitscope --help` must not pay for torch
    from dictionaries.dictionary_set import DictionarySet
    from dictionaries.models.loading import LoadedModel


@dataclass(frozen=True)
class ModelAndDictionaries:
    """``lm`` and ``dicts`` (in the model's dtype); ``source``: the dictionaries as named (or the shipped set's
    folder); ``local``: the directory they were read from."""

    lm: LoadedModel
    dicts: DictionarySet
    source: str
    local: Path


def load_model_and_dictionaries(model: str, dictionaries: str | None, dtype: str, device: str | None,
                                selectors: Mapping[str, Any] | None = None) -> ModelAndDictionaries:
    """Load ``model`` and ``dictionaries`` (default: the set shipped for ``model``; ``selectors`` pick the variant
    of a Gemma Scope 2 folder, and a hub id downloads only that one), checked to fit. The set is loaded in the
    model's dtype, so a set stored in bfloat16 (the shipped one) runs in float32 with a float32 model, exactly as
    its float32 copy would (converted slice by slice as the weights are used, never copied whole)."""
    from dictionaries.formats.registry import load_dictionaries
    from dictionaries.hub import resolve_dictionary_path
    from dictionaries.models.loading import check_model_reference, load_model

    check_model_reference(model)  # a model path that does not exist is named as such, before anything else
    if dictionaries is None:
        from dictionaries.bundled import default_dictionaries_path

        dictionaries = str(default_dictionaries_path(model))
    lm = load_model(model, dtype=dtype, device=device)
    selectors = dict(selectors or {})
    local = Path(resolve_dictionary_path(dictionaries, **selectors))
    # on a GPU the set computes there while its matrices stay mapped on the CPU (docs/design.md §7)
    dicts = load_dictionaries(local, dtype=lm.dtype, device=lm.device, **selectors)
    dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
    return ModelAndDictionaries(lm, dicts, dictionaries, local)
