"""Format detection, the one loading entry point, and conversion between formats."""

from __future__ import annotations

import pytest
import test_circuit_tracer_format as ct
import test_gemma_scope_2 as gs2
import torch
from safetensors.torch import load_file

from dictionaries.assembly import random_dictionary_set
from dictionaries.errors import CircuitscopeError, DictionaryFileError
from dictionaries.formats.native import load_native, save_native
from dictionaries.formats.registry import (
    convert,
    detect_format,
    load_dictionaries,
    save_dictionaries,
)


@pytest.fixture
def sources(tmp_path):
    """One directory of every layout."""
    paths = {name: tmp_path / name for name in ("gs2", "gs2-clt", "ct", "ct-clt", "native")}
    gs2.write_per_layer(paths["gs2"], skip=True)
    gs2.write_clt(paths["gs2-clt"])
    ct.write_per_layer(paths["ct"], skip=True)
    ct.write_clt(paths["ct-clt"])
    save_native(random_dictionary_set(3, 16, 24, skip=True), paths["native"])
    return paths


def test_detect_format(sources, tmp_path):
    assert {name: detect_format(path) for name, path in sources.items()} == {
        "gs2": "gemma-scope-2", "gs2-clt": "gemma-scope-2", "ct": "circuit-tracer", "ct-clt": "circuit-tracer",
        "native": "native",
    }
    assert detect_format(sources["gs2"] / "transcoder_all") == "gemma-scope-2"
    (tmp_path / "empty").mkdir()
    assert detect_format(tmp_path / "empty") is None
    assert detect_format(tmp_path / "nowhere") is None
    assert detect_format(sources["native"] / "layer_0.safetensors") is None


def test_load_dictionaries_dispatches_on_the_detected_or_named_format(sources):
    expected = {"gs2": "skip-transcoder", "gs2-clt": "clt", "ct": "skip-transcoder", "ct-clt": "clt",
                "native": "skip-transcoder"}
    for name, path in sources.items():
        assert load_dictionaries(path).kind == expected[name]
    assert load_dictionaries(sources["gs2"], "gemma_scope_2").config.source_format == "gemma-scope-2"
    assert load_dictionaries(sources["ct"], "Circuit-Tracer").config.source_format == "circuit-tracer"


def test_loaded_formats_compute_the_source_math(sources):
    xs = gs2.inputs()
    raw = [load_file(p) for p in sorted((sources["gs2"] / "transcoder_all").glob("*/params.safetensors"))]
    torch.testing.assert_close(load_dictionaries(sources["gs2"])(xs)[1], gs2.reference(raw, xs)[1])


def test_unknown_or_undetectable_format(sources, tmp_path):
    with pytest.raises(CircuitscopeError, match="unknown dictionary format 'saelens'; choose one of native, "
                       "gemma-scope-2, circuit-tracer"):
        load_dictionaries(sources["gs2"], "saelens")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictionaryFileError, match=r"empty: is not a dictionary directory of a known format.*native "
                       r"\(config.json.*gemma-scope-2 \(transcoder_all.*circuit-tracer \(layer_"):
        load_dictionaries(tmp_path / "empty")
    with pytest.raises(DictionaryFileError, match="nowhere: does not exist"):
        load_dictionaries(tmp_path / "nowhere")


def test_wrong_format_named_explicitly(sources):
    with pytest.raises(DictionaryFileError, match="no circuit-tracer files"):
        load_dictionaries(sources["gs2"], "circuit-tracer")
    with pytest.raises(DictionaryFileError, match="not a circuitscope dictionary directory"):
        load_dictionaries(sources["ct"], "native")


def test_selectors(sources):
    assert load_dictionaries(sources["gs2"], width="24", l0="small", affine=True).has_skip
    with pytest.raises(CircuitscopeError, match="unknown selector\\(s\\) size; the selectors are width, l0, affine"):
        load_dictionaries(sources["gs2"], size="big")
    with pytest.raises(CircuitscopeError, match="l0 select Gemma Scope 2 folders; .* is in the circuit-tracer format"):
        load_dictionaries(sources["ct"], l0="small")
    with pytest.raises(CircuitscopeError, match="one cross-layer transcoder: width=, l0= and affine= do not apply"):
        load_dictionaries(sources["gs2-clt"], l0="small")


def test_dtype_conversion_on_load(sources):
    dicts = load_dictionaries(sources["gs2-clt"], dtype=torch.bfloat16, device="cpu")
    assert dicts.dtype == torch.bfloat16 and dicts.config.dtype == "bfloat16"
    assert dicts.layer_tensors(1)["W_dec"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["gs2", "gs2-clt", "ct", "ct-clt"])
def test_convert_to_native(sources, tmp_path, name):
    loaded = convert(sources[name], tmp_path / "out", None)
    native = load_native(tmp_path / "out")
    assert native.config == loaded.config
    for layer in range(3):
        for key, tensor in loaded.layer_tensors(layer).items():
            assert torch.equal(native.layer_tensors(layer)[key], tensor)


def test_convert_between_source_formats(sources, tmp_path):
    convert(sources["gs2"], tmp_path / "gs2-native", "gemma-scope-2")
    convert(tmp_path / "gs2-native", tmp_path / "back", "native", to_format="gemma-scope-2")
    assert gs2.tree(tmp_path / "back") == gs2.tree(sources["gs2"])
    convert(sources["ct-clt"], tmp_path / "ct-back", to_format="circuit-tracer")
    assert gs2.tree(tmp_path / "ct-back") == gs2.tree(sources["ct-clt"])


def test_convert_refuses_a_non_empty_destination(sources, tmp_path):
    before = gs2.tree(sources["native"])
    with pytest.raises(CircuitscopeError, match="already exists and is not empty"):
        convert(sources["gs2"], sources["native"], "gemma-scope-2")
    assert gs2.tree(sources["native"]) == before
    convert(sources["gs2"], sources["native"], "gemma-scope-2", overwrite=True)
    assert load_native(sources["native"]).config.source_format == "gemma-scope-2"


def test_convert_of_a_broken_source_writes_nothing(sources, tmp_path):
    path = gs2.per_layer_file(sources["gs2"], 0).parent.parent / gs2.folder(0, True) / "params.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DictionaryFileError, match="file is truncated"):
        convert(sources["gs2"], tmp_path / "out", "gemma-scope-2")
    assert not (tmp_path / "out").exists()


def test_save_dictionaries_rejects_unknown_formats(tmp_path):
    with pytest.raises(CircuitscopeError, match="unknown dictionary format 'npz'"):
        save_dictionaries(random_dictionary_set(1, 4, 4), tmp_path / "o", "npz")


def test_a_native_directory_with_a_damaged_config_is_still_read_as_native(sources):
    (sources["native"] / "config.json").write_text("{not json")
    assert detect_format(sources["native"]) == "native"
    with pytest.raises(DictionaryFileError, match="config.json: corrupt JSON"):
        load_dictionaries(sources["native"])


def test_a_missing_path_is_named_whatever_the_format(tmp_path):
    for fmt in (None, "native", "gemma-scope-2", "circuit-tracer"):
        with pytest.raises(DictionaryFileError, match="nowhere: does not exist"):
            load_dictionaries(tmp_path / "nowhere", fmt)
