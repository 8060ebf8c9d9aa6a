"""Native format: clear errors for every damaged directory, and nothing half-written."""

import json

import pytest
import torch

from dictionaries.assembly import random_dictionary_set
from dictionaries.errors import CircuitscopeError, DictionaryFileError
from dictionaries.formats.native import is_native_directory, load_native, save_native


@pytest.fixture
def saved(tmp_path):
    dicts = random_dictionary_set(3, 8, 12, skip=True, seed=2)
    return save_native(dicts, tmp_path / "dicts"), dicts


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_round_trip_keeps_config_and_tensors(saved):
    directory, dicts = saved
    assert is_native_directory(directory)
    loaded = load_native(directory)
    assert loaded.config == dicts.config
    for layer in range(3):
        for name, tensor in dicts.layer_tensors(layer).items():
            assert torch.equal(tensor, loaded.layer_tensors(layer)[name])


def test_load_converts_dtype_on_request(saved):
    directory, _ = saved
    loaded = load_native(directory, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.config.dtype == "bfloat16"


def test_missing_config_says_how_to_convert(tmp_path):
    with pytest.raises(DictionaryFileError, match="not a circuitscope dictionary directory.*convert"):
        load_native(tmp_path)


def test_newer_format_version_asks_for_an_upgrade(saved):
    directory, _ = saved
    _edit_config(directory, format_version=99)
    with pytest.raises(DictionaryFileError, match="newer circuitscope .*format version 99.*Upgrade"):
        load_native(directory)


def test_invalid_config_names_the_field(saved):
    directory, _ = saved
    _edit_config(directory, widths=[12, 12])
    with pytest.raises(DictionaryFileError, match="invalid config .*widths has 2 entries for 3 layers"):
        load_native(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(DictionaryFileError, match="corrupt JSON"):
        load_native(directory)


def test_missing_layer_file_is_named(saved):
    directory, _ = saved
    (directory / "layer_1.safetensors").unlink()
    with pytest.raises(DictionaryFileError, match="layer_1.safetensors: missing.*layer 1 has no file"):
        load_native(directory)


def test_config_that_disagrees_with_tensors(saved):
    directory, _ = saved
    _edit_config(directory, d_model=16)
    with pytest.raises(DictionaryFileError, match="'W_enc' of layer 0 has shape \\[8, 12\\], expected \\[16, 12\\]"):
        load_native(directory)
    _edit_config(directory, d_model=8, skip=False)
    with pytest.raises(DictionaryFileError, match="unexpected tensor\\(s\\) W_skip"):
        load_native(directory)


def test_save_refuses_to_clobber_and_leaves_destination_untouched(saved, tmp_path):
    directory, dicts = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(CircuitscopeError, match="already exists and is not empty"):
        save_native(random_dictionary_set(2, 4, 4), directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    save_native(random_dictionary_set(2, 4, 4), directory, overwrite=True)
    assert load_native(directory).n_layers == 2
    assert [p.name for p in tmp_path.iterdir()] == ["dicts"]  # no temporary directories left behind


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import dictionaries.formats.native as native

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(native, "write_tensors", broken)
    with pytest.raises(OSError):
        save_native(random_dictionary_set(2, 4, 4), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        directory = save_native(random_dictionary_set(1, 4, 4), tmp_path / "shared")
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert stat.S_IMODE((directory / "layer_0.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((directory / "config.json").stat().st_mode) == 0o644
