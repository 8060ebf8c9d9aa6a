"""The format registry: a format registered in this file alone is detected, loaded, saved, converted and offered
by the CLI, with no edit anywhere else; and every list of formats comes from the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from dictionaries.assembly import build_dictionary_set, random_dictionary_set
from dictionaries.atomic_output import atomic_directory, write_text_atomic
from dictionaries.config import DictionaryConfig
from dictionaries.dictionary_set import DictionarySet
from dictionaries.errors import CircuitscopeError, DictionaryFileError
from dictionaries.formats import (
    DictionaryFormat,
    Selector,
    convert,
    detect_format,
    format_names,
    load_dictionaries,
    register,
    registered,
    save_dictionaries,
)
from dictionaries.formats.native import load_native, save_native
from dictionaries.formats.shapes import SourceDims, check_source_shapes
from dictionaries.safetensors_io import read_tensors, write_tensors

MARKER, WEIGHTS = "toy.json", "weights.safetensors"


# --- a toy format: one JSON config and one safetensors file holding every layer as "{L}.{name}" ----------------
def _is_toy(path: Path) -> bool:
    return (path / MARKER).is_file()


def _load_toy(path: Path, *, verify_values: bool = True) -> DictionarySet:
    config = DictionaryConfig.model_validate({**json.loads((path / MARKER).read_text()), "source_format": "toy"})
    tensors = read_tensors(path / WEIGHTS)
    layers = [{name.split(".", 1)[1]: t for name, t in tensors.items() if name.startswith(f"{layer}.")}
              for layer in range(config.n_layers)]
    return build_dictionary_set(config, layers, [path / WEIGHTS] * config.n_layers, verify_values)


def _save_toy(dictionaries: DictionarySet, directory: Path, *, overwrite: bool = False) -> Path:
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_tensors(tmp / WEIGHTS, {f"{layer}.{name}": t for layer in range(dictionaries.n_layers)
                                      for name, t in dictionaries.layer_tensors(layer).items()})
        write_text_atomic(tmp / MARKER, dictionaries.config.model_dump_json())
    return Path(directory)


TOY = DictionaryFormat(name="toy", layout=f"{MARKER} + {WEIGHTS}", detect=_is_toy, load=_load_toy, save=_save_toy)


def _same(a: DictionarySet, b: DictionarySet) -> bool:
    """Equal configs (but for where they were read from) and bit-equal tensors."""
    source = {"source_format": "trained"}
    return a.config.model_copy(update=source) == b.config.model_copy(update=source) and all(
        a.layer_tensors(layer).keys() == b.layer_tensors(layer).keys()
        and all(torch.equal(t, b.layer_tensors(layer)[name]) for name, t in a.layer_tensors(layer).items())
        for layer in range(a.n_layers)
    )


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture
def dicts() -> DictionarySet:
    return random_dictionary_set(3, 8, 12, architecture="cross-layer", skip=True, seed=4)


def test_a_format_registered_here_is_detected_loaded_saved_and_converted(dicts, tmp_path):
    assert "toy" not in format_names()
    with registered(TOY):
        assert format_names() == ("native", "gemma-scope-2", "circuit-tracer", "toy")
        save_dictionaries(dicts, tmp_path / "toy", "toy")
        assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == [MARKER, WEIGHTS]
        assert len(read_tensors(tmp_path / "toy" / WEIGHTS)) == 3 * 6  # W_enc b_enc W_dec b_dec threshold W_skip
        assert detect_format(tmp_path / "toy") == "toy"
        assert _same(load_dictionaries(tmp_path / "toy"), dicts)
        assert load_dictionaries(tmp_path / "toy").config.source_format == "toy"  # no edit of config.py needed
        assert load_dictionaries(tmp_path / "toy", "TOY").kind == "clt"
        # toy -> native -> toy, bit for bit
        assert _same(convert(tmp_path / "toy", tmp_path / "native"), dicts)
        assert _same(load_native(tmp_path / "native"), dicts)
        convert(tmp_path / "native", tmp_path / "back", to_format="toy")
        assert (tmp_path / "back" / WEIGHTS).read_bytes() == (tmp_path / "toy" / WEIGHTS).read_bytes()
    assert "toy" not in format_names()
    assert detect_format(tmp_path / "toy") is None


def test_the_cli_offers_a_registered_format(dicts, tmp_path):
    with registered(TOY):
        save_dictionaries(dicts, tmp_path / "toy", "toy")
        code, out = _run("dictionaries", "convert", "--help")
        assert code == 0 and "[native|gemma-scope-2|circuit-tracer|toy]" in out
        code, out = _run("dictionaries", "convert", str(tmp_path / "toy"), str(tmp_path / "native"), "--from", "toy")
        assert code == 0, out
        assert out == f"wrote clt (3 layers, d_model 8) to {tmp_path / 'native'}\n"
        assert _same(load_native(tmp_path / "native"), dicts)
        code, out = _run("dictionaries", "info", str(tmp_path / "toy"), "--json")
        assert code == 0, out
        assert json.loads(out)["format"] == "toy"
        code, out = _run("dictionaries", "info", str(tmp_path / "toy"), "--format", "toy", "--json")
        assert code == 0 and json.loads(out)["n_layers"] == 3
    code, out = _run("dictionaries", "convert", str(tmp_path / "toy"), str(tmp_path / "o"), "--from", "toy")
    assert code == 2 and "Invalid value for '--from'" in out and "'toy' is not one of" in out


def test_unknown_format_errors_list_the_registered_formats(dicts, tmp_path):
    save_native(dicts, tmp_path / "native")
    (tmp_path / "empty").mkdir()
    with registered(TOY):
        with pytest.raises(CircuitscopeError, match=r"unknown dictionary format 'saelens'; choose one of native, "
                           r"gemma-scope-2, circuit-tracer, toy$"):
            load_dictionaries(tmp_path / "native", "saelens")
        with pytest.raises(CircuitscopeError, match="unknown dictionary format 'npz'; choose one of .*, toy$"):
            save_dictionaries(dicts, tmp_path / "o", "npz")
        with pytest.raises(CircuitscopeError, match="unknown dictionary format 'npz'"):
            convert(tmp_path / "native", tmp_path / "o", to_format="npz")
        assert not (tmp_path / "o").exists()
        with pytest.raises(DictionaryFileError, match=r"empty: is not a dictionary directory of a known format\. "
                           r"Expected one of: native \(config\.json \+ layer_\{L\}\.safetensors\), .*, "
                           r"toy \(toy\.json \+ weights\.safetensors\)\. Point at such a directory"):
            load_dictionaries(tmp_path / "empty")
    with pytest.raises(CircuitscopeError, match="choose one of native, gemma-scope-2, circuit-tracer$"):
        load_dictionaries(tmp_path / "native", "toy")


def test_selectors_of_one_format_are_refused_for_another(dicts, tmp_path):
    with registered(TOY):
        save_dictionaries(dicts, tmp_path / "toy", "toy")
        with pytest.raises(CircuitscopeError, match=r"^width, affine select Gemma Scope 2 folders; .*toy is in the "
                           r"toy format$"):
            load_dictionaries(tmp_path / "toy", width="16k", affine=False)
        assert _same(load_dictionaries(tmp_path / "toy", width=None), dicts)  # None means not given


def test_a_new_format_may_bring_its_own_selectors(dicts, tmp_path):
    seen = []

    def load_picky(path: Path, *, verify_values: bool = True, **selectors) -> DictionarySet:
        seen.append(selectors)
        return _load_toy(path, verify_values=verify_values)

    picky = DictionaryFormat(
        name="picky-toy", layout="toy.json + weights.safetensors", detect=_is_toy, load=load_picky, save=_save_toy,
        selectors=(Selector("variant", "Picky toy: the variant to pick."),), variants="picky toy variants", priority=5,
    )
    with registered(TOY), registered(picky):
        assert format_names() == ("native", "gemma-scope-2", "picky-toy", "circuit-tracer", "toy")
        save_dictionaries(dicts, tmp_path / "toy", "toy")
        assert detect_format(tmp_path / "toy") == "picky-toy"  # priority 5 beats toy's 0
        load_dictionaries(tmp_path / "toy", variant="b", width=None)
        assert seen == [{"variant": "b"}]
        with pytest.raises(CircuitscopeError, match="^variant select picky toy variants; .* is in the toy format$"):
            load_dictionaries(tmp_path / "toy", "toy", variant="b")
        with pytest.raises(CircuitscopeError, match="the selectors are width, l0, affine, variant$"):
            load_dictionaries(tmp_path / "toy", size="big")


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        register(DictionaryFormat(name="native", layout="x", detect=_is_toy, load=_load_toy, save=_save_toy))
    with pytest.raises(ValueError, match="lowercase words joined by hyphens"):
        DictionaryFormat(name="Toy_Format", layout="x", detect=_is_toy, load=_load_toy, save=_save_toy)
    with pytest.raises(ValueError, match="must say what they select"):
        DictionaryFormat(name="toy", layout="x", detect=_is_toy, load=_load_toy, save=_save_toy,
                         selectors=(Selector("variant", "help"),))
    with pytest.raises(ValueError, match="'affine' of 'toy' is a flag in one format and not in another"):
        register(DictionaryFormat(name="toy", layout="x", detect=_is_toy, load=_load_toy, save=_save_toy,
                                  selectors=(Selector("affine", "help"),), variants="toys"))
    assert format_names() == ("native", "gemma-scope-2", "circuit-tracer")


def test_selector_command_line_words():
    assert Selector("width", "").cli_args("16k") == "--width 16k"
    assert Selector("affine", "", is_flag=True).cli_args(True) == "--affine"
    assert Selector("affine", "", is_flag=True).cli_args(False) == "--no-affine"


def test_shared_source_shape_check(tmp_path):
    """Both foreign readers check their files with one function: sizes come from the encoder's layout."""
    raw = {"enc": torch.zeros(5, 3), "dec": torch.zeros(5, 2, 3), "bias": torch.zeros(3)}
    expected = {"dec": ("d_sae", 2, "d_model"), "bias": ("d_model",), "absent": ("d_sae",)}
    dims = check_source_shapes(tmp_path, 1, raw, "enc", ("d_sae", "d_model"), expected, None, "Fix")
    assert dims == SourceDims(d_model=3, d_sae=5)
    with pytest.raises(DictionaryFileError, match=r"tensor 'dec' of layer 1 has shape \[5, 2, 3\], expected "
                       r"\[3, 2, 5\] \(d_model 5, d_sae 3\)\. Fix$"):
        check_source_shapes(tmp_path, 1, raw, "enc", ("d_model", "d_sae"), {"dec": ("d_sae", 2, "d_model")}, None,
                            "Fix")
    with pytest.raises(DictionaryFileError, match=r"layer 1 has d_sae 5 but layer 0 has 4; a CLT has one width"):
        check_source_shapes(tmp_path, 1, raw, "enc", ("d_sae", "d_model"), {}, SourceDims(3, 4), "Fix",
                            one_width=True)
    assert check_source_shapes(tmp_path, 1, raw, "enc", ("d_sae", "d_model"), {}, SourceDims(3, 4), "Fix") == dims
    with pytest.raises(DictionaryFileError, match=r"layer 1 has d_model 3 but layer 0 has d_model 7"):
        check_source_shapes(tmp_path, 1, raw, "enc", ("d_sae", "d_model"), {}, SourceDims(7, 5), "Fix")
    with pytest.raises(DictionaryFileError, match=r"tensor 'bias' has shape \[3\], expected \[d_model, d_sae\]"):
        check_source_shapes(tmp_path, 1, raw, "bias", ("d_model", "d_sae"), {}, None, "Fix")
