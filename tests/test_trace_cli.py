"""`circuitscope trace`: writes the graph JSON and prints the summary; user errors end in exit code 2 with one
`error:` line and no traceback."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import PROMPT

from circuits.graph.attribution_graph import AttributionGraph
from cli import main
from dictionaries.assembly import random_dictionary_set
from dictionaries.formats.native import save_native

D_MODEL, N_LAYERS = 32, 4  # the tiny checkpoint's shape (tests/conftest.py)


@pytest.fixture(scope="module")
def dictionary_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace-cli-dicts")
    dirs = {
        "transcoder": random_dictionary_set(N_LAYERS, D_MODEL, 16, seed=0),
        "clt": random_dictionary_set(N_LAYERS, D_MODEL, 8, architecture="cross-layer", skip=True, seed=1),
        "wrong-d-model": random_dictionary_set(N_LAYERS, 16, 16, seed=2),
        "wrong-layers": random_dictionary_set(3, D_MODEL, 16, seed=3),
    }
    return {name: str(save_native(d, root / name)) for name, d in dirs.items()}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _trace(*args):
    result = CliRunner().invoke(main, ["trace", *args])
    return result


def _assert_user_error(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_trace_writes_the_graph_and_prints_a_summary(tmp_path, tiny_checkpoint_dir, dictionary_dirs, kind):
    out = tmp_path / "graph.json"
    result = _trace(PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", dictionary_dirs[kind],
                    "-o", str(out), "--batch-size", "16")
    assert result.exit_code == 0, (result.output, result.exception)
    assert out.is_file() and not list(tmp_path.glob("*.tmp*"))
    graph = AttributionGraph.load(out)
    meta = graph.metadata
    assert meta.prompt == PROMPT and meta.model == str(tiny_checkpoint_dir)
    assert meta.dictionaries.source == dictionary_dirs[kind]
    assert meta.dictionaries.kind == {"transcoder": "transcoder", "clt": "clt"}[kind]
    assert json.loads(out.read_text())["format"] == "circuitscope.graph"
    text = result.stdout
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert {"prompt", "graph", "scores", "logits", "time"} <= set(lines), text
    assert f"{graph.graph.number_of_nodes()} nodes" in lines["graph"]
    assert f"{graph.graph.number_of_edges()} edges" in lines["graph"]
    assert f"{meta.n_active_features} active features" in lines["graph"] and str(out) in lines["graph"]
    assert f"replacement {meta.scores.replacement:.3f}" in lines["scores"]
    assert f"completeness {meta.scores.completeness:.3f}" in lines["scores"]
    for node in graph.logit_nodes:
        assert repr(graph.graph.nodes[node]["token"]) in lines["logits"]
    assert lines["time"].split()[1].replace(".", "").isdigit() and " s" in lines["time"]


def test_trace_with_targets_budget_and_position(tmp_path, tiny_checkpoint_dir, dictionary_dirs):
    out = tmp_path / "g.json"
    result = _trace(PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", dictionary_dirs["transcoder"],
                    "-o", str(out), "--target", "tree", "--target", "cat", "--position", "5", "--max-features", "20",
                    "--node-threshold", "1.0", "--edge-threshold", "1.0")
    assert result.exit_code == 0, (result.output, result.exception)
    graph = AttributionGraph.load(out)
    assert graph.metadata.target_position == 5 and graph.metadata.n_expanded_features == 20
    assert sorted(graph.graph.nodes[n]["token"] for n in graph.logit_nodes) == ["cat", "tree"]
    assert graph.nodes_of_kind("remainder")

    out2 = tmp_path / "diff.json"
    result = _trace(PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", dictionary_dirs["transcoder"],
                    "-o", str(out2), "--logit-diff", "tree", "house")
    assert result.exit_code == 0, (result.output, result.exception)
    assert AttributionGraph.load(out2).metadata.settings.logit_diff == ("tree", "house")


@pytest.mark.parametrize(
    "args, words",
    [
        (["", ], ["prompt is empty"]),
        (["   "], ["prompt is empty"]),
        ([" ".join(["the cat"] * 40)], ["at most 64"]),
        ([PROMPT, "--target", "the cat"], ["not one token"]),
        ([PROMPT, "--logit-diff", "tree", "the house"], ["not one token"]),
        ([PROMPT, "--node-threshold", "0"], ["node_threshold"]),
        ([PROMPT, "--edge-threshold", "1.5"], ["edge_threshold"]),
        ([PROMPT, "--max-logits", "0"], ["max_logits"]),
        ([PROMPT, "--position", "40"], ["position"]),
    ],
    ids=["empty", "blank", "too-long", "two-token-target", "two-token-diff", "node-threshold-0", "edge-threshold",
         "max-logits", "position"],
)
def test_user_errors_give_one_line_and_exit_code_2(tmp_path, tiny_checkpoint_dir, dictionary_dirs, args, words):
    out = tmp_path / "graph.json"
    prompt, *rest = args
    result = _trace(prompt, "--model", str(tiny_checkpoint_dir), "--dictionaries", dictionary_dirs["transcoder"],
                    "-o", str(out), *rest)
    _assert_user_error(result, *words)
    assert not out.exists()


def test_unknown_target_token_is_a_user_error(tmp_path, tiny_checkpoint_dir, dictionary_dirs):
    """'zebra' is not in the tiny vocabulary: the tokenizer maps it to <unk>, which is one token but not the
    token the user asked for."""
    result = _trace(PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", dictionary_dirs["transcoder"],
                    "-o", str(tmp_path / "g.json"), "--target", "zebra")
    _assert_user_error(result, "zebra")


@pytest.mark.parametrize(
    "name, words", [("wrong-d-model", ["d_model 16", "d_model 32"]), ("wrong-layers", ["3 layers"])]
)
def test_dictionaries_that_do_not_fit_the_model(tmp_path, tiny_checkpoint_dir, dictionary_dirs, name, words):
    result = _trace(PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", dictionary_dirs[name],
                    "-o", str(tmp_path / "g.json"))
    _assert_user_error(result, *words)


def test_missing_dictionaries_and_model(tmp_path, tiny_checkpoint_dir, dictionary_dirs):
    result = _trace(PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", str(tmp_path / "nothing"),
                    "-o", str(tmp_path / "g.json"))
    _assert_user_error(result)
    result = _trace(PROMPT, "--model", str(tmp_path / "no-model"), "--dictionaries", dictionary_dirs["transcoder"],
                    "-o", str(tmp_path / "g.json"))
    _assert_user_error(result)


def test_out_dir_gets_the_compact_graph_svg_and_html(tmp_path, tiny_checkpoint_dir, dictionary_dirs):
    out = tmp_path / "results"
    result = _trace(PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", dictionary_dirs["transcoder"],
                    "--out", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    assert sorted(p.name for p in out.iterdir()) == ["graph.html", "graph.safetensors", "graph.svg"]
    graph = AttributionGraph.load(out / "graph.safetensors")
    svg = (out / "graph.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert graph.metadata.prompt in (out / "graph.html").read_text()


def test_named_json_puts_the_drawings_beside_it_and_no_drawings_writes_only_json(tmp_path, tiny_checkpoint_dir,
                                                                                dictionary_dirs):
    args = [PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", dictionary_dirs["transcoder"]]
    result = _trace(*args, "-o", str(tmp_path / "a" / "run1.json"))
    assert result.exit_code == 0, (result.output, result.exception)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["run1.html", "run1.json", "run1.svg"]
    result = _trace(*args, "--out", str(tmp_path / "b"), "--no-drawings")
    assert result.exit_code == 0, (result.output, result.exception)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["graph.safetensors"]


def test_a_checkpoint_directory_without_dictionaries_asks_for_them(tmp_path, tiny_checkpoint_dir):
    result = _trace(PROMPT, "--model", str(tiny_checkpoint_dir), "--out", str(tmp_path))
    _assert_user_error(result, "--dictionaries")
    assert not (tmp_path / "graph.safetensors").exists()


def test_a_bfloat16_set_is_traced_in_the_models_float32(tmp_path, tiny_checkpoint_dir, dictionary_dirs):
    """The shipped set is stored in bfloat16; tracing it must give exactly the graph of the same weights held
    in float32 (features encoded in float32, not rounded to bfloat16 first)."""
    import torch

    from dictionaries.formats.native import load_native

    bf16 = save_native(load_native(dictionary_dirs["transcoder"], dtype=torch.bfloat16), tmp_path / "bf16")
    f32 = save_native(load_native(bf16, dtype=torch.float32), tmp_path / "f32")
    graphs = []
    for name, path in (("bf16", bf16), ("f32", f32)):
        result = _trace(PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", str(path),
                        "-o", str(tmp_path / f"{name}.json"), "--no-drawings")
        assert result.exit_code == 0, (result.output, result.exception)
        graphs.append(AttributionGraph.load(tmp_path / f"{name}.json").graph)
    assert set(graphs[0].edges) == set(graphs[1].edges)
    for edge in graphs[0].edges:
        assert graphs[0].edges[edge]["weight"] == graphs[1].edges[edge]["weight"]
