"""`circuitscope aggregate`: the per-feature and per-edge tables equal a brute-force count over the graphs; the
permutation test finds a planted difference and nothing on shuffled groups (fixed seed); the report is written."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_trace_many import _args, _write_prompts

from circuits.graph.attribution_graph import AttributionGraph
from circuits.many.aggregate import EDGE_COLUMNS, EdgeTally, FeatureEdges, GraphFeatures, csv_text
from circuits.many.compare import compare_groups, permutation_test
from cli import main
from dictionaries.assembly import random_dictionary_set
from dictionaries.formats.native import save_native

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_checkpoint_dir):
    root = tmp_path_factory.mktemp("aggregate")
    dictionaries = str(save_native(random_dictionary_set(4, 32, 16, seed=0), root / "tc"))
    out = root / "out"
    result = CliRunner().invoke(main, [*_args(_write_prompts(root / "p.jsonl"), out, tiny_checkpoint_dir,
                                                dictionaries), "--no-aggregate"])
    assert result.exit_code == 0, (result.output, result.exception)
    result = CliRunner().invoke(main, ["aggregate", str(out), "--compare", "a", "b", "--permutations", "200",
                                       "--pages"])
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_features_and_edges_equal_a_brute_force_count(traced):
    rows = json.loads((traced / "index.json").read_text())["prompts"]
    graphs = [(r["group"], AttributionGraph.load(traced / r["graph"])) for r in rows]
    expected: dict[tuple[str, str], list[tuple[float, float]]] = {}
    pairs: dict[tuple[str, str], list[float]] = {}
    for group, graph in graphs:
        per_graph: dict[str, list[float]] = {}
        for _, data in graph.graph.nodes(data=True):
            if data["kind"] == "feature":
                key = f"{data['layer']}:{data['feature']}"
                influence, activation = per_graph.get(key, [0.0, float("-inf")])
                per_graph[key] = [influence + data["influence"], max(activation, data["activation"])]
        for key, value in per_graph.items():
            for g in ("all", group):
                expected.setdefault((g, key), []).append(tuple(value))
        per_pair: dict[tuple[str, str], float] = {}
        for s, t, data in graph.graph.edges(data=True):
            ns, nt = graph.graph.nodes[s], graph.graph.nodes[t]
            if ns["kind"] == nt["kind"] == "feature":
                pair = (f"{ns['layer']}:{ns['feature']}", f"{nt['layer']}:{nt['feature']}")
                per_pair[pair] = per_pair.get(pair, 0.0) + data["weight"]
        for pair, w in per_pair.items():
            pairs.setdefault(pair, []).append(w)
    features = _read(traced / "features.csv")
    assert len(features) == len(expected) > 0
    for row in features:
        values = expected[(row["group"], row["feature_key"])]
        assert int(row["n_graphs"]) == len(values)
        assert float(row["mean_influence"]) == pytest.approx(sum(v[0] for v in values) / len(values), rel=1e-9)
        assert float(row["max_influence"]) == pytest.approx(max(v[0] for v in values), rel=1e-9)
        assert float(row["max_activation"]) == pytest.approx(max(v[1] for v in values), rel=1e-9)
    edges = _read(traced / "edges.csv")
    recurring = {p: ws for p, ws in pairs.items() if len(ws) >= 2}
    assert {(e["source"], e["target"]) for e in edges} == set(recurring)
    for e in edges:
        ws = recurring[(e["source"], e["target"])]
        assert int(e["n_graphs"]) == len(ws)
        assert float(e["mean_weight"]) == pytest.approx(sum(ws) / len(ws), rel=1e-9, abs=1e-12)
    assert [r["id"] for r in _read(traced / "prompts.csv")] == [r["id"] for r in rows]


def test_compare_writes_a_ranked_table_and_the_report_links_the_pages(traced):
    table = _read(traced / "compare-a-b.csv")
    differences = [abs(float(r["difference"])) for r in table]
    assert differences == sorted(differences, reverse=True)
    assert all(0 < float(r["p_value"]) <= 1 for r in table)
    report = (traced / "report.html").read_text()
    assert "<svg" in report and 'href="graphs/a1.html"' in report and "http" not in report.replace(
        "http://www.w3.org/2000/svg", "")
    assert (traced / "graphs" / "a1.html").is_file()


def _planted(shuffle: bool) -> list[GraphFeatures]:
    generator = random.Random(0)
    groups = ["a"] * 12 + ["b"] * 12
    if shuffle:
        generator.shuffle(groups)
    reduced = []
    for i, truth in enumerate(["a"] * 12 + ["b"] * 12):
        influence = {f"1:{k}": generator.gauss(1.0, 0.3) for k in range(20)}
        if truth == "a":
            influence["3:7"] = generator.gauss(2.0, 0.3)  # the planted feature: only in the first half
        reduced.append(GraphFeatures(str(i), groups[i], influence, dict(influence), {"3:7": "planted"}))
    return reduced


def test_the_permutation_test_finds_a_planted_difference():
    rows = compare_groups(_planted(shuffle=False), "a", "b", n_permutations=2000, seed=0)
    assert rows[0].feature_key == "3:7" and rows[0].label == "planted"
    assert rows[0].p_value < 0.001 and rows[0].effect_size > 3
    assert sum(r.p_value < 0.01 for r in rows) <= 2  # the 20 unplanted features: about 0.2 expected by chance


def test_shuffled_groups_show_no_difference():
    rows = compare_groups(_planted(shuffle=True), "a", "b", n_permutations=2000, seed=0)
    planted = next(r for r in rows if r.feature_key == "3:7")
    assert planted.p_value > 0.05
    assert sum(r.p_value < 0.01 for r in rows) <= 2


def test_the_permutation_p_value_equals_a_loop_over_the_same_permutations():
    x = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    in_a = torch.tensor([True] * 4 + [False] * 6)
    _, _, _, p = permutation_test(x, in_a, n_permutations=50, seed=3)
    order = torch.argsort(torch.rand(50, 10, generator=torch.Generator().manual_seed(3)), dim=1)
    observed = (x[in_a].mean(0) - x[~in_a].mean(0)).abs()
    count = torch.zeros(3)
    for perm in order:
        mask = in_a[perm]
        count += ((x[mask].mean(0) - x[~mask].mean(0)).abs() >= observed - 1e-12).float()
    assert torch.allclose(p, (1 + count.double()) / 51)


@pytest.mark.parametrize("merge_at", [1, 7, 1 << 20])
def test_edge_tally_equals_a_dict_count_however_often_it_merges(merge_at):
    """Graphs with overlapping random keys and pairs: the tally's counts and mean weights equal a dict's, whether
    it merges after every graph, now and then, or once at the end."""
    rng = np.random.default_rng(0)
    tally, expected = EdgeTally(merge_at=merge_at), {}
    for g in range(30):  # 9 possible keys: pairs recur across graphs and across merges
        keys = [f"{layer}:{index}" for layer, index in rng.integers(0, 3, size=(rng.integers(3, 12), 2))]
        keys = list(dict.fromkeys(keys))
        pairs = {(int(s), int(t)) for s, t in rng.integers(0, len(keys), size=(8, 2))}
        sources, targets = (np.array(c, dtype=np.int32) for c in zip(*sorted(pairs), strict=True))
        weights = rng.normal(size=len(pairs))
        tally.add(GraphFeatures(str(g), None, dict.fromkeys(keys, 1.0), dict.fromkeys(keys, 1.0), {},
                                FeatureEdges(sources, targets, weights)))
        for s, t, w in zip(sources, targets, weights, strict=True):
            expected.setdefault((keys[s], keys[t]), []).append(float(w))
    rows = tally.table(min_count=1).rows()
    assert {(r["source"], r["target"]): r["n_graphs"] for r in rows} == {p: len(w) for p, w in expected.items()}
    for r in rows:
        ws = expected[(r["source"], r["target"])]
        assert r["mean_weight"] == pytest.approx(sum(ws) / len(ws), rel=1e-12, abs=1e-15)
    recurring = tally.table(min_count=2)
    assert len(recurring) == sum(len(w) >= 2 for w in expected.values()) > 0
    chunked = b"".join(recurring.csv_chunks(rows_per_chunk=3)).decode()  # written a few rows at a time
    assert chunked == csv_text(recurring.rows(), EDGE_COLUMNS) and chunked.count("\n") == len(recurring) + 1
    assert rows == sorted(rows, key=lambda r: (-r["n_graphs"], -abs(r["mean_weight"]), r["source"], r["target"]))
