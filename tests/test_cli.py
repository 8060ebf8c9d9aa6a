"""The `circuitscope dictionaries` commands: output, conversion, and exit code 2 with one message for bad input."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli import main
from dictionaries.assembly import random_dictionary_set
from dictionaries.formats.native import load_native, save_native

N_LAYERS, D_MODEL, D_SAE = 3, 8, 16


def _write_gemma_scope_2(root, affine=True, nan_layer=None):
    gen = torch.Generator().manual_seed(0)
    for layer in range(N_LAYERS):
        params = {
            "w_enc": torch.randn(D_MODEL, D_SAE, generator=gen),
            "b_enc": torch.randn(D_SAE, generator=gen),
            "threshold": torch.rand(D_SAE, generator=gen),
            "w_dec": torch.randn(D_SAE, D_MODEL, generator=gen),
            "b_dec": torch.randn(D_MODEL, generator=gen),
        }
        if affine:
            params["affine_skip_connection"] = torch.randn(D_MODEL, D_MODEL, generator=gen)
        if layer == nan_layer:
            params["w_dec"][3, 2] = float("nan")
        folder = root / "transcoder_all" / f"layer_{layer}_width_16k_l0_small{'_affine' if affine else ''}"
        folder.mkdir(parents=True)
        save_file(params, folder / "params.safetensors")
    return root


def _run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_info_prints_json_with_the_issue_keys(tmp_path):
    save_native(random_dictionary_set(N_LAYERS, D_MODEL, D_SAE, architecture="cross-layer", skip=True), tmp_path / "d")
    code, out = _run("dictionaries", "info", str(tmp_path / "d"), "--json")
    assert code == 0, out
    info = json.loads(out)
    assert {k: info[k] for k in ("kind", "n_layers", "d_model", "width", "activation", "skip", "source_format")} == {
        "kind": "clt", "n_layers": 3, "d_model": 8, "width": 16, "activation": "jumprelu", "skip": True,
        "source_format": "trained",
    }
    code, out = _run("dictionaries", "info", str(tmp_path / "d"))
    assert code == 0 and "clt" in out and "d_model" in out


def test_convert_gemma_scope_2_then_info(tmp_path):
    _write_gemma_scope_2(tmp_path / "gs")
    code, out = _run("dictionaries", "convert", str(tmp_path / "gs"), str(tmp_path / "native"),
                     "--from", "gemma-scope-2")
    assert code == 0, out
    assert load_native(tmp_path / "native").kind == "skip-transcoder"
    code, out = _run("dictionaries", "info", str(tmp_path / "native"), "--json")
    info = json.loads(out)
    assert (info["kind"], info["source_format"], info["skip"], info["width"]) == (
        "skip-transcoder", "gemma-scope-2", True, 16)
    code, out = _run("dictionaries", "info", str(tmp_path / "gs"), "--json")
    assert code == 0 and json.loads(out)["format"] == "gemma-scope-2"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("nan", "contains NaN or infinite values"),
        ("missing_layer", "layer 1"),
        ("truncated", "truncated"),
        ("missing_path", "no such file or directory"),
    ],
)
def test_bad_input_exits_2_with_one_message(tmp_path, damage, message):
    root = _write_gemma_scope_2(tmp_path / "gs", nan_layer=2 if damage == "nan" else None)
    layer1 = root / "transcoder_all" / "layer_1_width_16k_l0_small_affine"
    if damage == "missing_layer":
        for f in layer1.iterdir():
            f.unlink()
        layer1.rmdir()
    if damage == "truncated":
        params = layer1 / "params.safetensors"
        params.write_bytes(params.read_bytes()[:-100])
    src = str(root) if damage != "missing_path" else str(tmp_path / "nowhere")
    code, out = _run("dictionaries", "convert", src, str(tmp_path / "out"), "--from", "gemma-scope-2")
    assert code == 2
    assert out.startswith("error: ") and message in out
    assert "Traceback" not in out
    assert not (tmp_path / "out").exists()


def test_convert_refuses_to_overwrite_without_force(tmp_path):
    _write_gemma_scope_2(tmp_path / "gs")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, out = _run("dictionaries", "convert", str(tmp_path / "gs"), str(tmp_path / "out"), "--from", "gemma-scope-2")
    assert code == 2 and "--force" in out
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    code, out = _run("dictionaries", "convert", str(tmp_path / "gs"), str(tmp_path / "out"),
                     "--from", "gemma-scope-2", "--force")
    assert code == 0 and load_native(tmp_path / "out").n_layers == N_LAYERS


def test_unknown_format_choice_is_a_usage_error(tmp_path):
    code, out = _run("dictionaries", "convert", str(tmp_path), str(tmp_path / "o"), "--from", "sae-lens")
    assert code == 2 and "Invalid value for '--from'" in out


def test_model_mismatch_is_caught_before_anything_is_written(tmp_path):
    _write_gemma_scope_2(tmp_path / "gs")
    code, out = _run("dictionaries", "convert", str(tmp_path / "gs"), str(tmp_path / "out"), "--from", "gemma-scope-2",
                     "--model", "gemma-3-270m")
    assert code == 2
    assert "error: the dictionaries have d_model 8 but gemma-3-270m has d_model 640" in out
    assert not (tmp_path / "out").exists()
    save_native(random_dictionary_set(18, 640, 4), tmp_path / "fits")
    code, out = _run("dictionaries", "info", str(tmp_path / "fits"), "--model", "gemma-3-270m")
    assert code == 0, out
    code, out = _run("dictionaries", "info", str(tmp_path / "fits"), "--model", "gemma-3-1b-it")
    assert code == 2 and "d_model 640 but gemma-3-1b-it has d_model 1152" in out


def test_model_check_reads_a_checkpoint_config(tmp_path, tiny_checkpoint_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoint_dir)
    save_native(random_dictionary_set(config.num_hidden_layers + 1, config.hidden_size, 4), tmp_path / "d")
    code, out = _run("dictionaries", "info", str(tmp_path / "d"), "--model", str(tiny_checkpoint_dir))
    assert code == 2 and f"cover {config.num_hidden_layers + 1} layers but" in out
