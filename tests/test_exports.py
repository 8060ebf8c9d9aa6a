"""The package's own graph JSON (loss-free round trips, old and newer schemas, damaged files) and the
Neuronpedia frontend JSON (unique ids, links that join, honest feature types)."""

import json

import networkx as nx
import pytest
from graph_helpers import as_filed, assert_same_graph, hand_built_graph, traced_graph

from circuits.graph.attribution_graph import GRAPH_SCHEMA_VERSION, AttributionGraph
from circuits.graph.neuronpedia import (
    NeuronpediaOptions,
    save_neuronpedia,
    to_neuronpedia,
)
from circuits.graph.supernodes import group_by_feature, merge_nodes
from circuits.graph.unpruned import full_graph
from circuits.graph.weights import input_totals, logit_weight
from dictionaries.errors import CircuitscopeError


def test_round_trip_of_a_traced_graph(tiny_lm, tmp_path):
    graph = traced_graph(tiny_lm)
    loaded = AttributionGraph.load(graph.save(tmp_path / "g.json"))
    assert_same_graph(as_filed(graph), loaded)
    assert json.loads((tmp_path / "g.json").read_text())["schema_version"] == GRAPH_SCHEMA_VERSION
    again = AttributionGraph.load(loaded.save(tmp_path / "again.json"))
    assert (tmp_path / "again.json").read_text() == (tmp_path / "g.json").read_text()
    assert_same_graph(loaded, again)


def test_round_trip_of_supernodes(tmp_path):
    merged = merge_nodes(hand_built_graph(), group_by_feature(hand_built_graph()))
    loaded = AttributionGraph.load(merged.save(tmp_path / "m.json"))
    assert_same_graph(merged, loaded)
    assert loaded.graph.nodes["supernode:0:5"]["children"] == ["feature:0:5@1", "feature:0:5@2"]


def _recomputed_influence(graph: AttributionGraph) -> dict[str, float]:
    """influence[s] = sum_t |A[t, s]| / sum_s' |A[t, s']| * (w[t] + influence[t]), swept from the logits down."""
    totals = input_totals(graph)
    influence = dict.fromkeys(graph.graph, 0.0)
    for t in reversed(list(nx.topological_sort(graph.graph))):
        if totals[t]:
            scale = (logit_weight(graph, t) + influence[t]) / totals[t]
            for s, _, w in graph.graph.in_edges(t, data="weight"):
                influence[s] += abs(w) * scale
    return influence


def test_unpruned_section_gives_back_the_whole_graph(tiny_lm, tmp_path):
    graph = traced_graph(tiny_lm, keep_unpruned=True)
    assert graph.unpruned is not None and graph.unpruned.weights
    loaded = AttributionGraph.load(graph.save(tmp_path / "g.json"))
    assert_same_graph(as_filed(graph), loaded)
    whole = full_graph(loaded)
    assert set(graph.graph) < set(whole.graph)
    assert set(graph.graph.edges) < set(whole.graph.edges)
    for s, t, w in graph.graph.edges(data="weight"):
        assert whole.graph.edges[s, t]["weight"] == w
    # the stored influence is the unpruned graph's: recomputing it on the restored graph must agree,
    # which holds only when every edge that pruning removed is back
    recomputed = _recomputed_influence(whole)
    for node, data in whole.graph.nodes(data=True):
        assert recomputed[node] == pytest.approx(data["influence"], rel=1e-4, abs=1e-7)
    pruned_only = _recomputed_influence(graph)
    assert any(pruned_only[n] != pytest.approx(d["influence"], rel=1e-3) for n, d in graph.graph.nodes(data=True))
    assert full_graph(traced_graph(tiny_lm)) is not None  # nothing kept: the graph itself


def test_schema_1_files_still_load(tmp_path):
    raw = json.loads(hand_built_graph().to_json())
    raw["schema_version"] = 1
    del raw["unpruned"]
    for node in raw["nodes"]:
        del node["children"]
    (tmp_path / "v1.json").write_text(json.dumps(raw))
    graph = AttributionGraph.load(tmp_path / "v1.json")
    assert_same_graph(graph, hand_built_graph())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.update(schema_version=GRAPH_SCHEMA_VERSION + 1), "newer circuitscope"),
        (lambda raw: raw.update(format="something else"), "not a circuitscope graph"),
        (lambda raw: raw["edges"].append({"source": "token@0", "target": "ghost", "weight": 1.0}), "not in the file"),
        (lambda raw: raw["nodes"].append(raw["nodes"][0]), "share an id"),
        (lambda raw: raw["nodes"][0].update(kind="neuron"), "nodes.0.kind"),
        (lambda raw: raw.update(unpruned={"endpoints": ["token@0"], "sources": [0], "targets": [3], "weights": [1]}),
         "outside endpoints"),
        (lambda raw: raw.update(unpruned={"endpoints": ["ghost"], "sources": [0], "targets": [0], "weights": [1]}),
         "unpruned edge"),
    ],
)
def test_bad_files_get_one_clear_message(tmp_path, change, message):
    raw = json.loads(hand_built_graph().to_json())
    change(raw)
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(CircuitscopeError, match=message):
        AttributionGraph.load(tmp_path / "bad.json")


def test_truncated_and_missing_files(tmp_path):
    text = hand_built_graph().to_json()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(CircuitscopeError, match="not a graph JSON file"):
        AttributionGraph.load(tmp_path / "cut.json")
    with pytest.raises(CircuitscopeError, match="no such graph file"):
        AttributionGraph.load(tmp_path / "missing.json")


def _check_neuronpedia(graph: AttributionGraph, options=None):
    exported = to_neuronpedia(graph, options)
    ids = [n.node_id for n in exported.nodes]
    assert len(set(ids)) == len(ids) == graph.graph.number_of_nodes()
    assert len({n.jsNodeId for n in exported.nodes}) == len(ids)
    # the frontend groups nodes across positions by layer_feature (errors apart): only one feature may share one
    groups = {}
    for n in exported.nodes:
        if n.feature_type != "mlp reconstruction error":
            groups.setdefault((n.layer, n.feature), []).append(n.feature_type)
    assert all(set(types) == {"cross layer transcoder"} for types in groups.values() if len(types) > 1)
    known = set(ids)
    assert len(exported.links) == graph.graph.number_of_edges()
    assert all(link.source in known and link.target in known for link in exported.links)
    return exported


def test_neuronpedia_export_of_a_traced_graph(tiny_lm, tmp_path):
    graph = traced_graph(tiny_lm)
    exported = _check_neuronpedia(graph)
    by_type = {}
    for node in exported.nodes:
        by_type.setdefault(node.feature_type, []).append(node)
    assert set(by_type) == {"embedding", "cross layer transcoder", "mlp reconstruction error", "logit"}
    assert len(by_type["embedding"]) == len(graph.metadata.tokens) and all(n.layer == "E" for n in by_type["embedding"])
    assert all(n.feature == -1 for n in by_type["mlp reconstruction error"])
    logits = by_type["logit"]
    assert sum(n.is_target_logit for n in logits) == 1
    top = max(logits, key=lambda n: n.token_prob)
    assert top.is_target_logit and float(top.clerp.split("(p=")[1].rstrip(")")) == pytest.approx(top.token_prob,
                                                                                                  abs=1e-3)
    assert all(n.layer == str(graph.metadata.n_layers + 1) for n in logits)
    shares = sorted(n.influence for n in exported.nodes if n.feature_type != "logit")
    assert 0 < shares[0] and shares[-1] == pytest.approx(1.0)
    path = save_neuronpedia(graph, tmp_path / "g.np.json")
    raw = json.loads(path.read_text())
    assert list(raw) == ["metadata", "qParams", "nodes", "links"]
    assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "clerp", "influence", "activation",
            "token_prob", "is_target_logit", "jsNodeId"} <= set(raw["nodes"][0])
    assert raw["metadata"]["prompt_tokens"] == graph.metadata.tokens
    assert raw["metadata"]["transcoder_list"] == ["random"]


def test_neuronpedia_export_of_remainders_and_supernodes(tiny_lm):
    graph = traced_graph(tiny_lm, max_features=20)
    remainders = graph.nodes_of_kind("remainder")
    assert remainders
    exported = _check_neuronpedia(graph)
    unexplored = [n for n in exported.nodes if n.feature_type == "unexplored node"]
    assert len(unexplored) == len(remainders)
    assert all(n.feature < -1 for n in unexplored) and len({n.feature for n in unexplored}) == len(unexplored)
    merged = merge_nodes(graph, group_by_feature(graph))
    exported = _check_neuronpedia(merged)
    supernodes = [n for n in exported.nodes if n.feature_type == "supernode"]
    assert len(supernodes) == len(merged.nodes_of_kind("supernode")) > 0


def test_neuronpedia_options():
    graph = hand_built_graph()
    options = NeuronpediaOptions(slug="cat", scan="gemma-3-270m", supernodes={"animal": ["feature:0:5@1",
                                                                                      "feature:0:5@2"]},
                                 pinned=["feature:1:3@2"])
    exported = to_neuronpedia(graph, options)
    assert exported.metadata.slug == "cat" and exported.metadata.scan == "gemma-3-270m"
    assert exported.qParams.supernodes == [["animal", "0_5_1", "0_5_2"]]
    assert exported.qParams.pinnedIds == ["1_3_2"]
    assert to_neuronpedia(graph).metadata.slug == "the-cat"
    with pytest.raises(CircuitscopeError, match="no node"):
        to_neuronpedia(graph, NeuronpediaOptions(pinned=["ghost"]))
