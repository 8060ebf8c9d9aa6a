"""Mistakes a researcher makes are caught before the long work, with one clear line (issue 14, "failing early"):
output paths that cannot be written, a model path that does not exist, interventions on inactive features; and the
trace summary names every phase's time."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import PROMPT
from test_attribution_edges import make_dictionaries

from circuits.interventions.feature_interventions import FeatureIntervention, intervene
from cli import main
from dictionaries.errors import CircuitscopeError
from dictionaries.formats.native import save_native

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def dicts(tiny_lm):
    return make_dictionaries(tiny_lm, seed=21)


@pytest.fixture(scope="module")
def dicts_dir(dicts, tmp_path_factory):
    return str(save_native(dicts, tmp_path_factory.mktemp("fail-early") / "dicts"))


def _one_error_line(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def no_trace(monkeypatch):
    """Fail the test if the trace itself runs."""
    import circuits.tracing

    monkeypatch.setattr(circuits.tracing, "trace", lambda *a, **k: pytest.fail("the trace ran"))


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_trace(tmp_path, tiny_checkpoint_dir, dicts_dir,
                                                                           no_trace):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries",
                                       dicts_dir, "-o", str(blocker / "sub" / "graph.json")])
    _one_error_line(result, "cannot create the folder", str(blocker / "sub"))


def test_an_unwritable_output_folder_is_refused_before_the_trace(tiny_checkpoint_dir, dicts_dir, no_trace):
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries",
                                       dicts_dir, "-o", "/proc/graph.json"])  # not writable even by root
    _one_error_line(result, "cannot write /proc/graph.json")


def test_an_output_that_is_a_folder_is_refused(tmp_path, tiny_checkpoint_dir, dicts_dir, no_trace):
    (tmp_path / "g.html").mkdir()
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries",
                                       dicts_dir, "-o", str(tmp_path / "g.json")])
    _one_error_line(result, "is a directory")


def test_a_missing_output_folder_is_made_and_said(tmp_path, tiny_checkpoint_dir, dicts_dir):
    out = tmp_path / "new" / "deeper" / "graph.json"
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries",
                                       dicts_dir, "-o", str(out), "--no-drawings"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert out.is_file() and f"note: created the folder {out.parent}" in result.stderr
    assert not list(out.parent.glob(".*check"))  # the write probe leaves nothing behind
    # every phase a user waits for is named in the summary
    line = next(line for line in result.stdout.splitlines() if line.startswith("time"))
    for phase in ("loading", "forward", "plan", "attribution", "pruning", "building the graph", "writing files"):
        assert phase in line, line


@pytest.mark.parametrize("model", ["/no/such/dir", "./missing-checkpoint", "no/such/dir/x"])
def test_a_model_path_that_does_not_exist_is_named(model):
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", model])
    _one_error_line(result, f"the model path {model.removeprefix('./')}", "does not exist")


def test_ablating_an_inactive_feature_warns_and_names_the_active_ones(tiny_lm, dicts):
    probe = intervene(tiny_lm, dicts, PROMPT, [FeatureIntervention.ablate(1, 0, 5)])
    f = probe.clean_features
    here = (f.layer == 1) & (f.position == 5)
    active = set(f.index[here].tolist())
    off = min(set(range(16)) - active)
    on = int(f.index[here][f.activation[here].argmax()])
    result = intervene(tiny_lm, dicts, PROMPT, [FeatureIntervention.ablate(1, off, 5),
                                                 FeatureIntervention.ablate(1, on, 5),
                                                 FeatureIntervention(layer=1, feature=off, position=5, value=3.0)])
    warnings = result.inactive()
    assert len(warnings) == 1  # the active ablation and the set of an inactive feature are real changes
    assert warnings[0].startswith(f"ablate 1:{off}@5 changes nothing") and f"1:{on} (" in warnings[0]


def test_intervene_prints_the_warning_and_puts_it_in_json(tiny_checkpoint_dir, dicts_dir, tiny_lm, dicts):
    f = intervene(tiny_lm, dicts, PROMPT, [FeatureIntervention.ablate(1, 0, 5)]).clean_features
    off = min(set(range(16)) - set(f.index[(f.layer == 2) & (f.position == 3)].tolist()))
    args = ["intervene", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", dicts_dir,
            "--ablate", f"2:{off}@3", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"warning: ablate 2:{off}@3 changes nothing" in result.stderr
    assert json.loads(result.stdout)["warnings"][0].startswith(f"ablate 2:{off}@3 changes nothing")


def test_check_writable_refuses_with_one_sentence(tmp_path):
    from dictionaries.atomic_output import check_writable

    assert check_writable(tmp_path / "x" / "y.json") is True and (tmp_path / "x").is_dir()
    assert check_writable(tmp_path / "x" / "y.json") is False
    with pytest.raises(CircuitscopeError, match="is a directory"):
        check_writable(tmp_path)
