"""Paths that explain (minimum feature hops, no direct edges, excluded kinds, a layer range) and automatic
supernodes, on hand-built graphs whose answers are worked out by hand, and on random DAGs checked by brute force.

The hand-built graph of ``graph_helpers`` plus one edge token@2 -> error:0@2 (the error's only input, share 1):
into logit:10@2 the paths are 0:5@2 (0.5 * 0.8 = 0.4), the direct token@2 edge (0.2), the error (0.25 * 0.8 =
0.2), 0:5@1 (0.8 / 6) and 0:7@2 (0.8 / 12).
"""

import itertools
import math

import networkx as nx
import pytest
from graph_helpers import FEATURE_FIELDS, hand_built_graph, random_layered_graph

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.paths import FEATURE_HOP_KINDS, PathFilter, parse_layer_range, strongest_paths
from circuits.graph.supernodes import (
    SUPERNODE_PREFIX,
    AutoGrouping,
    describe_groups,
    group_automatically,
    merge_by,
    merge_nodes,
    node_groups,
)
from circuits.graph.weights import normalised_weights
from dictionaries.errors import CircuitscopeError

THROUGH_0_5 = ("token@2", "feature:0:5@2", "feature:1:3@2", "logit:10@2")
DIRECT = ("token@2", "logit:10@2")
THROUGH_ERROR = ("token@2", "error:0@2", "feature:1:3@2", "logit:10@2")
THROUGH_0_5_AT_1 = ("token@1", "feature:0:5@1", "feature:1:3@2", "logit:10@2")
THROUGH_0_7 = ("token@2", "feature:0:7@2", "feature:1:3@2", "logit:10@2")


@pytest.fixture
def graph():
    graph = hand_built_graph()
    graph.graph.add_edge("token@2", "error:0@2", weight=0.7)
    return graph


def _found(graph, **filters) -> dict[tuple, float]:
    return {tuple(p.nodes): p.strength for p in strongest_paths(graph, k=10, only=PathFilter(**filters))}


def test_every_path_by_default(graph):
    assert _found(graph) == pytest.approx({THROUGH_0_5: 0.4, DIRECT: 0.2, THROUGH_ERROR: 0.2,
                                           THROUGH_0_5_AT_1: 0.8 / 6, THROUGH_0_7: 0.8 / 12})


def test_no_direct_edge(graph):
    assert set(_found(graph, direct=False)) == {THROUGH_0_5, THROUGH_ERROR, THROUGH_0_5_AT_1, THROUGH_0_7}
    # into logit:11@2: the direct token@1 edge goes, the path through 0:7@2 stays
    paths = strongest_paths(graph, "logit:11@2", only=PathFilter(direct=False))
    assert [p.nodes for p in paths] == [["token@2", "feature:0:7@2", "logit:11@2"]]


def test_minimum_feature_hops(graph):
    # the error path passes one feature (1:3@2), the others two; the direct edge none
    assert set(_found(graph, min_feature_hops=1)) == {THROUGH_0_5, THROUGH_ERROR, THROUGH_0_5_AT_1, THROUGH_0_7}
    assert set(_found(graph, min_feature_hops=2)) == {THROUGH_0_5, THROUGH_0_5_AT_1, THROUGH_0_7}
    assert _found(graph, min_feature_hops=3) == {}
    # k counts the paths that qualify: the best two with two hops, though the direct edge is stronger
    paths = strongest_paths(graph, k=2, only=PathFilter(min_feature_hops=2))
    assert [tuple(p.nodes) for p in paths] == [THROUGH_0_5, THROUGH_0_5_AT_1]


def test_excluded_kinds(graph):
    assert set(_found(graph, exclude_kinds=frozenset({"error"}))) == {
        THROUGH_0_5, DIRECT, THROUGH_0_5_AT_1, THROUGH_0_7}
    assert set(_found(graph, exclude_kinds=frozenset({"feature"}))) == {DIRECT}  # the target's own kind is fine
    with pytest.raises(CircuitscopeError, match="unknown node kind 'mistake'"):
        PathFilter(exclude_kinds=frozenset({"mistake"}))


def test_layer_range(graph):
    # every intermediate node must lie in the range: only the direct edge has none when the range misses layer 0
    assert set(_found(graph, layers=(1, 1))) == {DIRECT}
    assert set(_found(graph, layers=(0, 1))) == set(_found(graph))
    paths = strongest_paths(graph, "logit:11@2", only=PathFilter(layers=(0, 0), direct=False))
    assert [p.nodes for p in paths] == [["token@2", "feature:0:7@2", "logit:11@2"]]


def test_layer_ranges_parse_and_check():
    assert parse_layer_range("3-9") == (3, 9) and parse_layer_range("5") == (5, 5)
    for bad in ("9-3", "a-b", "3-"):
        with pytest.raises(CircuitscopeError, match="layer range"):
            parse_layer_range(bad)
    with pytest.raises(CircuitscopeError, match=">= 0"):
        PathFilter(min_feature_hops=-1)


def _allowed(graph, nodes, only: PathFilter) -> bool:
    """The filter's meaning, written out for one whole path (independent of the sweep)."""
    data = graph.graph.nodes
    between = nodes[1:-1]
    if not only.direct and len(nodes) == 2:
        return False
    if any(data[v]["kind"] in only.exclude_kinds for v in between):
        return False
    if only.layers and any(not only.layers[0] <= data[v]["layer"] <= only.layers[1] for v in between):
        return False
    return sum(data[v]["kind"] in FEATURE_HOP_KINDS for v in between) >= only.min_feature_hops


FILTERS = [PathFilter(), PathFilter(direct=False), PathFilter(min_feature_hops=1), PathFilter(min_feature_hops=2),
           PathFilter(min_feature_hops=3, exclude_kinds=frozenset({"error"})), PathFilter(layers=(1, 2)),
           PathFilter(min_feature_hops=1, layers=(0, 2), direct=False, exclude_kinds=frozenset({"error"}))]


@pytest.mark.parametrize("seed", range(6))
def test_the_sweep_finds_the_exact_top_k_of_every_filter(seed):
    """Brute force: every simple path from a token into the top logit, filtered and ranked by its product."""
    graph = random_layered_graph(seed)
    share = normalised_weights(graph)
    target = "logit:100@2"
    every = [p for t in graph.nodes_of_kind("token") for p in nx.all_simple_paths(graph.graph, t, target)]
    assert len(every) > 30
    for only in FILTERS:
        kept = sorted(((math.prod(share[e] for e in itertools.pairwise(p)), tuple(p)) for p in every
                       if _allowed(graph, p, only)), reverse=True)[:7]
        paths = strongest_paths(graph, k=7, only=only)
        assert [p.strength for p in paths] == pytest.approx([s for s, _ in kept]), only
        assert all(_allowed(graph, p.nodes, only) for p in paths)
        assert {tuple(p.nodes) for p in paths if p.strength > kept[-1][0] * (1 + 1e-9)} == {
            p for s, p in kept if s > kept[-1][0] * (1 + 1e-9)}  # the same paths, up to ties at the cut


# --- automatic supernodes ---------------------------------------------------------------------------------------


def _graph(nodes: dict[str, tuple], edges: list[tuple[str, str, float]]) -> AttributionGraph:
    """nodes: id -> (kind, layer, position, influence, label)."""
    g = nx.DiGraph()
    for node, (kind, layer, position, influence, label) in nodes.items():
        g.add_node(node, **{**FEATURE_FIELDS, "kind": kind, "layer": layer, "position": position,
                            "influence": influence, "label": label,
                            "feature_key": f"{layer}:{node}" if kind == "feature" else None})
    g.add_weighted_edges_from(edges)
    return AttributionGraph(g, hand_built_graph().metadata)


TWINS = {"t0": ("token", -1, 0, 0.0, None), "t1": ("token", -1, 1, 0.0, None),
         "a": ("feature", 0, 1, 0.4, "twin"), "b": ("feature", 0, 1, 0.3, "twin"), "d": ("feature", 0, 1, 0.2, "d"),
         "c": ("feature", 1, 1, 0.5, "c"), "e": ("error", 0, 1, 0.1, None), "logit": ("logit", 2, 1, 0.0, None)}
TWIN_EDGES = [("t1", "a", 1.0), ("t1", "b", 2.0), ("t0", "d", -1.0), ("a", "c", 1.0), ("b", "c", 1.0),
              ("e", "c", 0.5), ("c", "logit", 2.0), ("d", "logit", 1.0)]


def test_automatic_groups_of_twins():
    """a and b have the same inputs and outputs (similarity 1); c and d share their output only (0.5, above
    the default threshold 0.4); a and c share nothing (0); the error stays out."""
    graph = _graph(TWINS, TWIN_EDGES)
    assert group_automatically(graph) == {"L0@1#0": ["a", "b"], "L0-1@1#0": ["c", "d"]}
    assert group_automatically(graph, AutoGrouping(band=1)) == {"L0@1#0": ["a", "b"]}  # c alone in layer 1
    assert group_automatically(graph, AutoGrouping(threshold=0.6)) == {"L0@1#0": ["a", "b"]}
    merged = merge_by(graph, "auto")
    assert merged.graph.nodes["supernode:L0@1#0"]["label"] == "twin"  # the most influential member's label
    assert merged.graph.edges["t1", "supernode:L0@1#0"]["weight"] == 3.0
    assert merged.graph.edges["supernode:L0@1#0", "supernode:L0-1@1#0"]["weight"] == 2.0
    assert merged.graph.edges["t0", "supernode:L0-1@1#0"]["weight"] == -1.0  # into d, now part of the group
    assert ("supernode:L0-1@1#0", "supernode:L0-1@1#0") not in merged.graph.edges  # none within a group


def test_labels_join_features_and_groups_on_a_cycle_are_split():
    """x (layer 0) and y (layer 2) agree in label only; z (layer 1) runs from x to y, so merging x and y would
    close a loop through z: the group is split into its layers, leaving nothing to merge."""
    nodes = {"t1": ("token", -1, 1, 0.0, None), "x": ("feature", 0, 1, 0.3, "same"),
             "z": ("feature", 1, 1, 0.1, "other"), "y": ("feature", 2, 1, 0.2, "same"),
             "logit": ("logit", 3, 1, 0.0, None)}
    settings = AutoGrouping(band=3, threshold=0.9, label_bonus=1.0)
    edges = [("t1", "x", 1.0), ("x", "z", 1.0), ("t1", "y", 1.0), ("y", "logit", 1.0)]
    assert group_automatically(_graph(nodes, [*edges, ("z", "y", 1.0)]), settings) == {}
    assert group_automatically(_graph(nodes, [*edges, ("z", "logit", 1.0)]), settings) == {"L0-2@1#0": ["x", "y"]}
    # x and y share their input only (similarity 0.5): the label bonus carries them over the threshold
    no_bonus = AutoGrouping(band=3, threshold=0.9, label_bonus=0.0)
    assert group_automatically(_graph(nodes, [*edges, ("z", "logit", 1.0)]), no_bonus) == {}
    with pytest.raises(CircuitscopeError, match="band"):
        AutoGrouping(band=0)


def _members(merged, node) -> list[str]:
    return merged.graph.nodes[node]["children"] if node.startswith(SUPERNODE_PREFIX) else [node]


@pytest.mark.parametrize("seed", range(4))
def test_automatic_groups_are_deterministic_acyclic_disjoint_and_sum_every_edge(seed):
    graph = random_layered_graph(seed, n_layers=6, positions=3, density=0.6)
    settings = AutoGrouping(band=3, threshold=0.2)
    groups = group_automatically(graph, settings)
    assert groups == group_automatically(graph, settings)
    assert len(groups) >= 2
    members = [n for group in groups.values() for n in group]
    assert len(members) == len(set(members))
    assert all(graph.graph.nodes[n]["kind"] == "feature" for n in members)
    merged = merge_nodes(graph, groups)
    assert nx.is_directed_acyclic_graph(merged.graph)
    assert strongest_paths(merged, k=3)
    for s, t in itertools.product(merged.graph.nodes, repeat=2):  # brute force over every pair of merged nodes
        total = [graph.graph.edges[u, v]["weight"] for u in _members(merged, s) for v in _members(merged, t)
                 if graph.graph.has_edge(u, v)]
        if s == t or not total:
            assert not merged.graph.has_edge(s, t)
        else:
            assert merged.graph.edges[s, t]["weight"] == pytest.approx(sum(total))


def test_groups_summarised_for_a_table():
    graph = _graph(TWINS, TWIN_EDGES)
    summaries = describe_groups(graph, node_groups(graph, "auto"))
    assert [(s.name, s.members, s.layers, s.positions, s.labels) for s in summaries] == [
        ("L0-1@1#0", ["c", "d"], (0, 1), [1], ["c", "d"]), ("L0@1#0", ["a", "b"], (0, 0), [1], ["twin"])]
    assert summaries[0].influence == pytest.approx(0.7)
    assert node_groups(graph, "label") == {"twin": ["a", "b"]}
    with pytest.raises(CircuitscopeError, match="unknown grouping"):
        node_groups(graph, "nope")
