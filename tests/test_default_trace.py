"""The main job, as a new user runs it: ``circuitscope trace "The capital of France is"`` with no other flags, on
the real Gemma 3 270M and the dictionaries shipped in the package; and the shipped set itself: it loads, it is as
good on held-out text as the README says, and it survives a Gemma Scope 2 export.

Run with ``pytest -m real_model tests/test_default_trace.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.paths import PathFilter, strongest_paths
from circuits.graph.supernodes import merge_by
from cli import main
from dictionaries.bundled import default_dictionaries_path
from dictionaries.evaluation import evaluate
from dictionaries.formats.gemma_scope_2 import save_gemma_scope_2
from dictionaries.formats.registry import load_dictionaries
from dictionaries.jumprelu_calibration import jumprelu_copy

pytestmark = pytest.mark.real_model

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = Path(__file__).resolve().parent / "data" / "brown_heldout_contexts.json"


@pytest.fixture(scope="module")
def shipped():
    return load_dictionaries(default_dictionaries_path("gemma-3-270m"))


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("main-job")
    result = CliRunner().invoke(main, ["trace", "The capital of France is", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result.stdout


def test_the_main_job_writes_three_files_and_a_summary(main_job):
    out, stdout = main_job
    assert sorted(p.name for p in out.iterdir()) == ["graph.html", "graph.safetensors", "graph.svg"]
    assert all((out / name).stat().st_size > 1000 for name in ("graph.html", "graph.safetensors", "graph.svg"))
    labels = {line.split()[0] for line in stdout.splitlines() if line.strip()}
    assert {"graph", "scores", "logits", "time"} <= labels, stdout
    assert "' Paris'" in stdout


def test_paris_is_a_logit_node_reached_by_feature_paths_from_france_and_capital(main_job):
    graph = AttributionGraph.load(main_job[0] / "graph.safetensors")
    G = graph.graph
    assert graph.metadata.dictionaries.source == str(default_dictionaries_path("gemma-3-270m"))
    paris = [n for n in graph.logit_nodes if G.nodes[n]["token"] == " Paris"]
    assert len(paris) == 1
    for word in (" France", " capital"):
        token = next(n for n in graph.nodes_of_kind("token") if G.nodes[n]["token"] == word)
        paths = strongest_paths(graph, paris[0], k=10, sources=[token])
        through_features = [p for p in paths if any(G.nodes[n]["kind"] == "feature" for n in p.nodes[1:-1])]
        assert through_features, f"no feature path from {word!r} to ' Paris': {paths}"
        assert all(p.sign != 0 and p.strength > 0 for p in through_features)


def test_paths_with_a_feature_hop_go_through_features_and_groups_read_in_concepts(main_job):
    """On the default graph the strongest paths are mostly one edge, token -> logit; with --min-feature-hops 1
    every listed path passes a feature, and the automatic groups merge into an acyclic graph."""
    graph_path = main_job[0] / "graph.safetensors"
    result = CliRunner().invoke(main, ["query", str(graph_path), "paths", "--min-feature-hops", "1", "--json"])
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout)
    graph = AttributionGraph.load(graph_path)
    kinds = graph.graph.nodes
    assert len(paths) == 5
    assert all(sum(kinds[n]["kind"] == "feature" for n in p["nodes"][1:-1]) >= 1 for p in paths)
    unconstrained = strongest_paths(graph, k=5)
    assert paths[0]["strength"] <= unconstrained[0].strength
    assert [p["nodes"] for p in paths] == [p.nodes for p in strongest_paths(graph, only=PathFilter(min_feature_hops=1))]
    result = CliRunner().invoke(main, ["query", str(graph_path), "supernodes", "--top", "5", "--json"])
    groups = json.loads(result.stdout)
    assert len(groups) == 5 and all(len(g["members"]) > 1 for g in groups)
    merged = merge_by(graph, "auto")
    assert strongest_paths(merged, k=3, only=PathFilter(min_feature_hops=1))  # acyclic: paths do not refuse


def _readme_mean_fvu() -> float:
    """The mean FVU the README states for the shipped set on the held-out contexts of tests/data (the line
    'on the 8 held-out contexts in tests/data/brown_heldout_contexts.json: X')."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"8 held-out contexts in `?tests/data/brown_heldout_contexts.json`?:\s*\**([0-9.]+)", text)
    assert match, "README.md must state the shipped set's mean FVU on tests/data/brown_heldout_contexts.json"
    return float(match.group(1))


def test_the_shipped_set_loads_and_its_held_out_fvu_matches_the_readme(real_lm, shipped):
    assert shipped.n_layers == real_lm.n_layers and shipped.d_model == real_lm.d_model
    assert shipped.dtype == torch.bfloat16
    contexts = torch.tensor(json.loads(HELD_OUT.read_text())["contexts"])
    report = evaluate(shipped, real_lm, contexts, batch_size=4)
    mean_fvu = sum(layer.fvu for layer in report.layers) / len(report.layers)
    readme = _readme_mean_fvu()
    assert abs(mean_fvu - readme) <= 0.002, (mean_fvu, readme)
    assert max(layer.l0 for layer in report.layers) <= 64 + 1e-6


def test_the_shipped_set_round_trips_through_the_gemma_scope_2_layout(tmp_path, real_lm, shipped):
    """Gemma Scope 2 stores JumpReLU only: the TopK set goes there as its calibrated JumpReLU copy, and the
    package's Gemma Scope 2 reader gives back every tensor bit for bit; on other held-out contexts the copy keeps
    about as many features per token as the TopK set (within 0.6x-1.5x per layer)."""
    contexts = torch.tensor(json.loads(HELD_OUT.read_text())["contexts"])
    copy = jumprelu_copy(shipped, real_lm, contexts[:4])
    save_gemma_scope_2(copy, tmp_path / "gs2")
    again = load_dictionaries(tmp_path / "gs2", "gemma-scope-2")
    assert again.kind == shipped.kind and again.has_skip and again.widths == shipped.widths
    assert again.config.activation.type == "jumprelu"
    for layer in range(shipped.n_layers):
        ours, theirs = copy.layer_tensors(layer), again.layer_tensors(layer)
        assert ours.keys() == theirs.keys() == set(shipped.layer_tensors(layer)) | {"threshold"}
        for name in ours:
            assert torch.equal(ours[name].float(), theirs[name].float()), (layer, name)
    copied = [layer.l0 for layer in evaluate(again, real_lm, contexts[4:], batch_size=4).layers]
    topk = [layer.l0 for layer in evaluate(shipped, real_lm, contexts[4:], batch_size=4).layers]
    assert all(0.6 * b <= a <= 1.5 * b for a, b in zip(copied, topk, strict=True)), list(zip(copied, topk, strict=True))


def test_the_validation_report_on_the_default_graph_agrees_in_sign(real_lm, main_job):
    """Zeroing each of the default graph's 20 most influential features moves the ' Paris'... target logit the
    way the graph predicts for most of them (attention and norms frozen, features recomputed)."""
    from circuits.interventions.validation import validate_graph

    graph = AttributionGraph.load(main_job[0] / "graph.safetensors")
    dicts = load_dictionaries(default_dictionaries_path("gemma-3-270m"), dtype=torch.float32)
    report = validate_graph(real_lm, dicts, graph, top=20, modes=("frozen", "free"))
    frozen = report.agreement["frozen"]
    assert len(report.rows) == 20
    assert frozen.sign_agreement >= 0.7 and frozen.pearson >= 0.5, frozen
