"""The registry names which dictionary set the package ships for which model, and the lookup says clearly
when there is none."""

from __future__ import annotations

import pytest

from dictionaries.bundled import BUNDLED_ROOT, default_dictionaries_path
from dictionaries.errors import CircuitscopeError
from dictionaries.formats.native import read_config
from dictionaries.models.registry import all_entries, lookup


def test_the_270m_has_a_shipped_set_that_fits_it():
    path = default_dictionaries_path("gemma-3-270m")
    assert path.parent == BUNDLED_ROOT
    assert default_dictionaries_path("google/gemma-3-270m") == path
    config = read_config(path)
    entry = lookup("gemma-3-270m")
    assert (config.n_layers, config.d_model) == (entry.size.n_layers, entry.size.d_model)
    assert config.dtype == "bfloat16" and config.skip


@pytest.mark.parametrize("model", ["gemma-3-1b", "gemma-3-270m-it", "/some/checkpoint/dir"])
def test_models_without_a_shipped_set_are_told_to_pass_dictionaries(model):
    with pytest.raises(CircuitscopeError, match="pass --dictionaries"):
        default_dictionaries_path(model)


def test_every_registry_entry_names_an_existing_folder_or_none():
    for entry in all_entries():
        if entry.bundled_dictionaries is not None:
            assert (BUNDLED_ROOT / entry.bundled_dictionaries / "config.json").is_file(), entry.name
