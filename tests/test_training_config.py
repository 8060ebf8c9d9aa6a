"""Bad training settings end in one clear message naming the fix, before any work starts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from training_helpers import fast_config

from cli import main
from dictionaries.errors import CircuitscopeError
from dictionaries.training import check_before_work, make_config
from dictionaries.training.trainer_config import parse_int_list

pytestmark = pytest.mark.usefixtures("single_thread")

BASE = dict(kind="transcoder", width=64, k=8, tokens=1000, out="/tmp/unused")


@pytest.mark.parametrize("overrides, message", [
    (dict(width=0), "width: Input should be greater than or equal to 1"),
    (dict(k=65), "k = 65 is larger than the width 64; use k <= width"),
    (dict(k=None), "needs --k"),
    (dict(activation="jumprelu", k=None), "needs --target-l0 N"),
    (dict(activation="jumprelu"), "jumprelu takes no --k"),
    (dict(target_l0=4), "apply to jumprelu"),
    (dict(matryoshka=[32, 16]), "must be increasing"),
    (dict(matryoshka=[16, 128]), "matryoshka size 128 is larger than the width 64"),
    (dict(kind="clt", layers=[1]), "a cross-layer transcoder covers every layer"),
    (dict(kind="clt", distributed="layers"), "use --distributed data for a CLT"),
    (dict(clt_skip=True), "for a per-layer skip use --kind skip-transcoder"),
    (dict(layers=[1, 1]), "repeats a layer"),
    (dict(resume=True, force=True), "pass one of them"),
    (dict(tokens=0), "tokens: Input should be greater than or equal to 1"),
])
def test_bad_values_are_refused_with_the_fix(overrides, message):
    with pytest.raises(CircuitscopeError, match="bad training settings") as info:
        make_config(**{**BASE, **overrides})
    assert message in str(info.value)


def test_valid_settings_and_derived_values():
    config = make_config(**{**BASE, "kind": "clt", "clt_skip": True, "matryoshka": [16, 32], "tokens": 10_000})
    assert config.has_skip and config.architecture == "cross-layer"
    assert config.prefix_sizes == [16, 32, 64] and config.total_steps == 3
    assert config.learning_rate == pytest.approx(2e-4 * (16384 / 64) ** 0.5)
    assert make_config(**{**BASE, "kind": "skip-transcoder"}).has_skip
    assert parse_int_list("1024, 4096", "--matryoshka") == [1024, 4096]
    with pytest.raises(CircuitscopeError, match="--layers 'a,b': expected comma-separated integers"):
        parse_int_list("a,b", "--layers")


def test_checks_against_model_data_and_output(tiny_checkpoint_dir, text_file, tmp_path):
    def check(out=tmp_path / "out", **overrides):
        return check_before_work(fast_config(tiny_checkpoint_dir, text_file, out, **overrides))

    assert check() == (4, 32)
    with pytest.raises(CircuitscopeError, match=r"unknown layer\(s\) \[4\]: .* has layers 0..3"):
        check(layers=[0, 4])
    with pytest.raises(CircuitscopeError, match="no such file or directory"):
        check(data=str(tmp_path / "missing.txt"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(CircuitscopeError, match="is not writable"):
        check(out=str(blocker / "out"))
    with pytest.raises(CircuitscopeError, match="is a file"):
        check(out=str(blocker))
    with pytest.raises(CircuitscopeError, match="holds no training run; start without --resume"):
        check(resume=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CircuitscopeError, match="holds other files"):
        check(out=str(other), force=True)
    with pytest.raises(CircuitscopeError, match="--cache .* is not writable"):
        check(cache_dir=str(blocker / "cache"))


def test_cli_reports_bad_settings_before_loading_anything(tiny_checkpoint_dir, text_file, tmp_path):
    def run(*extra):
        args = ["dictionaries", "train", "--model", str(tiny_checkpoint_dir), "--kind", "transcoder",
                "--tokens", "100", "--data", str(text_file), "--out", str(tmp_path / "o"), *extra]
        return CliRunner().invoke(main, args)

    result = run("--width", "0", "--k", "4")
    assert result.exit_code == 2 and "width: Input should be greater than or equal to 1" in result.output
    result = run("--width", "8", "--k", "9")
    assert result.exit_code == 2 and "k = 9 is larger than the width 8" in result.output
    result = run("--width", "8", "--k", "4", "--layers", "7")
    assert result.exit_code == 2 and "unknown layer(s) [7]" in result.output
    result = run("--width", "8", "--k", "4", "--data", str(tmp_path / "nope.jsonl"))
    assert result.exit_code == 2 and "nope.jsonl: no such file or directory" in result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_trains_with_a_progress_bar_and_evaluates(tiny_checkpoint_dir, text_file, tmp_path):
    import json

    out = tmp_path / "o"
    result = CliRunner().invoke(main, [
        "dictionaries", "train", "--model", str(tiny_checkpoint_dir), "--kind", "skip-transcoder", "--width", "32",
        "--k", "4", "--tokens", "1024", "--data", str(text_file), "--out", str(out), "--context-length", "16",
        "--batch-tokens", "256", "--harvest-batch", "8", "--lr", "0.01"])
    assert result.exit_code == 0, result.output
    assert f"wrote skip-transcoder (4 layers, width 32) to {out}" in result.stdout
    for field in ("tok/s", "loss=", "fvu=", "l0=", "dead="):
        assert field in result.stderr
    result = CliRunner().invoke(main, ["dictionaries", "eval", str(out), "--tokens", "60", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["layer"] for r in report["layers"]] == [0, 1, 2, 3] and report["tokens"] == 60
    for key in ("fvu", "l0", "dead_fraction"):
        assert key in report["total"] and key in report["layers"][0]
    assert {"ce_clean", "ce_spliced", "delta_ce", "kl"} <= set(report)
    result = CliRunner().invoke(main, ["dictionaries", "eval", str(out), "--tokens", "60", "--no-progress"])
    assert result.exit_code == 0 and "total" in result.stdout and "cross-entropy" in result.stdout
