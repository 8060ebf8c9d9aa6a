"""A Gemma Scope 2 folder with several variants per layer (issue 17): every command that loads dictionaries takes
``--width``, ``--l0`` and ``--affine/--no-affine``, runs end to end on the chosen variant, and without them ends
in one ``error:`` line naming the selectors and exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import PROMPT

from circuits.graph.attribution_graph import AttributionGraph
from cli import main
from dictionaries.assembly import random_dictionary_set
from dictionaries.formats.gemma_scope_2 import (
    FOLDERS_KEY,
    TRANSCODER_DIR,
    save_gemma_scope_2,
)

D_MODEL, N_LAYERS = 32, 4  # the tiny checkpoint's shape (tests/conftest.py)
# (width, l0, affine) -> the dictionaries' width; the widths tell the variants apart in a graph's metadata
VARIANTS = {("16", "small", False): 16, ("24", "big", True): 24}

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def gs2_dir(tmp_path_factory):
    """One ``transcoder_all/`` holding both variants of every layer, written by the Gemma Scope 2 writer."""
    root = tmp_path_factory.mktemp("gs2-variants")
    combined = root / "gs2" / TRANSCODER_DIR
    combined.mkdir(parents=True)
    for seed, ((width, l0, affine), d_sae) in enumerate(VARIANTS.items()):
        dicts = random_dictionary_set(N_LAYERS, D_MODEL, d_sae, skip=affine, seed=seed)
        suffix = "_affine" if affine else ""
        dicts.config.metadata[FOLDERS_KEY] = json.dumps(
            [f"layer_{layer}_width_{width}_l0_{l0}{suffix}" for layer in range(N_LAYERS)])
        single = save_gemma_scope_2(dicts, root / f"{width}-{l0}")
        for folder in (single / TRANSCODER_DIR).iterdir():
            folder.rename(combined / folder.name)
    assert len(list(combined.iterdir())) == N_LAYERS * len(VARIANTS)
    return root / "gs2"


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_selector_error(result):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    message = lines[0]
    assert "several folders match" in message
    for name in ("width", "l0", "affine"):
        assert f"--{name}" in message or f"{name}=" in message, message


@pytest.mark.parametrize(("selectors", "width"), [(["--width", "24", "--l0", "big"], 24),
                                                  (["--width", "16", "--l0", "small"], 16),
                                                  (["--no-affine"], 16)])
def test_trace_loads_the_chosen_variant(tmp_path, tiny_checkpoint_dir, gs2_dir, selectors, width):
    out = tmp_path / "g.json"
    result = _invoke("trace", PROMPT, "--model", tiny_checkpoint_dir, "--dictionaries", gs2_dir, *selectors,
                     "-o", out, "--no-drawings", "--batch-size", "16")
    assert result.exit_code == 0, (result.output, result.exception)
    meta = AttributionGraph.load(out).metadata
    assert meta.dictionaries.widths == [width] * N_LAYERS
    assert meta.dictionaries.source == str(gs2_dir)


def test_trace_without_selectors_names_them(tmp_path, tiny_checkpoint_dir, gs2_dir):
    result = _invoke("trace", PROMPT, "--model", tiny_checkpoint_dir, "--dictionaries", gs2_dir,
                     "-o", tmp_path / "g.json", "--no-drawings")
    _assert_selector_error(result)
    assert not (tmp_path / "g.json").exists()


def test_intervene_and_validate_take_the_selectors(tmp_path, tiny_checkpoint_dir, gs2_dir):
    common = ["--model", tiny_checkpoint_dir, "--dictionaries", gs2_dir]
    chosen = ["--width", "24", "--l0", "big", "--affine"]
    # feature 23 exists in the 24-wide variant only
    result = _invoke("intervene", PROMPT, *common, *chosen, "--ablate", "2:23@-1", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)
    assert report["interventions"][0] == {"layer": 2, "feature": 23, "position": len(report["prompt_tokens"]) - 1,
                                          "mode": "set", "value": 0.0}
    _assert_selector_error(_invoke("intervene", PROMPT, *common, "--ablate", "2:23"))

    graph = tmp_path / "g.json"
    assert _invoke("trace", PROMPT, *common, *chosen, "-o", graph, "--no-drawings").exit_code == 0
    # the graph names its dictionaries' folder, not the variant: validate needs the selectors again
    _assert_selector_error(_invoke("validate", graph, "--top", "2", "--mode", "linear"))
    result = _invoke("validate", graph, *chosen, "--top", "2", "--mode", "linear", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["modes"] == ["linear"]


def test_dictionaries_info_takes_the_selectors(gs2_dir):
    result = _invoke("dictionaries", "info", gs2_dir, "--l0", "big", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["width"], info["skip"]) == (24, True)
    _assert_selector_error(_invoke("dictionaries", "info", gs2_dir))
