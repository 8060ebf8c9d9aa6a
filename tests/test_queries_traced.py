"""Queries on graphs traced from the tiny model: answers checked against independent recomputation."""

import itertools
import math

import networkx as nx
import pytest
from graph_helpers import traced_graph

from circuits.graph.compare import compare_graphs
from circuits.graph.lookup import top_logit
from circuits.graph.paths import strongest_paths
from circuits.graph.queries import NodeQuery, node_report, search_nodes, top_nodes
from circuits.graph.subgraphs import influence_subgraph, neighbourhood
from circuits.graph.supernodes import group_by_feature, merge_nodes


@pytest.fixture(scope="module")
def graph(tiny_lm):
    return traced_graph(tiny_lm)


def _share(graph, s, t):
    total = sum(abs(w) for _, _, w in graph.graph.in_edges(t, data="weight"))
    return abs(graph.graph.edges[s, t]["weight"]) / total


def test_paths_are_real_paths_ranked_by_their_product(graph):
    target = top_logit(graph)
    probabilities = [graph.graph.nodes[n]["probability"] for n in graph.logit_nodes]
    assert graph.graph.nodes[target]["probability"] == max(probabilities)
    paths = strongest_paths(graph, k=8)
    assert len(paths) == 8
    for path in paths:
        assert graph.graph.nodes[path.nodes[0]]["kind"] == "token" and path.nodes[-1] == target
        pairs = list(itertools.pairwise(path.nodes))
        assert path.strength == pytest.approx(math.prod(_share(graph, s, t) for s, t in pairs))
        assert path.sign == math.prod(1 if graph.graph.edges[e]["weight"] >= 0 else -1 for e in pairs)
    strengths = [p.strength for p in paths]
    assert strengths == sorted(strengths, reverse=True)


def test_paths_are_the_true_top_k(graph):
    """Brute force over every simple path into a feature target with a small ancestry."""
    target = min((n for n in graph.nodes_of_kind("feature") if graph.graph.nodes[n]["layer"] == 2),
                 key=lambda n: len(nx.ancestors(graph.graph, n)))
    tokens = graph.nodes_of_kind("token")
    every = [p for t in tokens for p in nx.all_simple_paths(graph.graph, t, target)]
    best = sorted((math.prod(_share(graph, s, t) for s, t in itertools.pairwise(p)) for p in every), reverse=True)[:5]
    assert [p.strength for p in strongest_paths(graph, target, k=5)] == pytest.approx(best)


def test_node_report_covers_every_edge(graph):
    node = top_nodes(graph, 1, "feature")[0]
    report = node_report(graph, node)
    assert len(report.inputs) == graph.graph.in_degree(node) and len(report.outputs) == graph.graph.out_degree(node)
    assert sum(c.share for c in report.inputs) == pytest.approx(1.0)
    magnitudes = [abs(c.weight) for c in report.outputs]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert report.data["feature_key"] == graph.graph.nodes[node]["feature_key"]


def test_search_and_top(graph):
    influences = [graph.graph.nodes[n]["influence"] for n in top_nodes(graph, 10)]
    assert influences == sorted(influences, reverse=True)
    node = top_nodes(graph, 1, "feature")[0]
    key = graph.graph.nodes[node]["feature_key"]
    found = search_nodes(graph, NodeQuery(feature=key))
    assert node in found and all(graph.graph.nodes[n]["feature_key"] == key for n in found)
    paris = search_nodes(graph, NodeQuery(token="paris", kind="feature"))
    assert paris and all(graph.graph.nodes[n]["position"] == 6 for n in paris)  # "paris" is token 6 (BOS first)


def test_subgraphs_nest(graph):
    small, large = influence_subgraph(graph, 0.3), influence_subgraph(graph, 0.9)
    assert set(small.graph) < set(large.graph) <= set(graph.graph)
    assert set(graph.logit_nodes) <= set(small.graph)
    node = top_nodes(graph, 1, "feature")[0]
    one, two = neighbourhood(graph, node, 1), neighbourhood(graph, node, 2)
    assert set(one.graph) == {node} | set(graph.graph.predecessors(node)) | set(graph.graph.successors(node))
    assert set(one.graph) < set(two.graph)


def test_merging_features_keeps_every_edge_weight(graph):
    groups = group_by_feature(graph)
    assert groups, "the tiny graph should have features active at several positions"
    merged = merge_nodes(graph, groups)
    assert merged.graph.number_of_nodes() == graph.graph.number_of_nodes() - sum(len(g) - 1 for g in groups.values())
    total = sum(w for _, _, w in graph.graph.edges(data="weight"))
    assert sum(w for _, _, w in merged.graph.edges(data="weight")) == pytest.approx(total)  # no edge is inner
    assert sum(d["influence"] for _, d in merged.graph.nodes(data=True)) == pytest.approx(
        sum(d["influence"] for _, d in graph.graph.nodes(data=True)))
    assert strongest_paths(merged, k=3)
    assert compare_graphs(graph, merged).feature_overlap == 1.0  # supernodes keep their feature key


def test_compare_two_prompts(tiny_lm, graph):
    other = traced_graph(tiny_lm, prompt="the cat was in the house and the dog was in the tree")
    result = compare_graphs(graph, other, top=5)
    assert not result.same_prompt and result.same_dictionaries
    assert result.shared_features and result.only_a and result.only_b
    assert 0 < result.feature_overlap < 1
    deltas = [abs(c.delta) for c in result.changed]
    assert deltas == sorted(deltas, reverse=True) and len(result.changed) <= 5


def test_automatic_groups_of_a_traced_graph_read_as_a_smaller_acyclic_graph(graph):
    from circuits.graph.supernodes import group_automatically, merge_by

    groups = group_automatically(graph)
    assert groups, "the tiny graph should have features alike enough to group"
    merged = merge_by(graph, "auto")
    assert nx.is_directed_acyclic_graph(merged.graph)
    assert merged.graph.number_of_nodes() == graph.graph.number_of_nodes() - sum(len(g) - 1 for g in groups.values())
    kinds = {graph.graph.nodes[n]["kind"] for members in groups.values() for n in members}
    assert kinds == {"feature"}
    assert sum(d["influence"] for _, d in merged.graph.nodes(data=True)) == pytest.approx(
        sum(d["influence"] for _, d in graph.graph.nodes(data=True)))
    assert strongest_paths(merged, k=3)
