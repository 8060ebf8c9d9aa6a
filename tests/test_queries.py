"""Every query on the hand-built graph of ``graph_helpers``, whose answers are worked out by hand.

Inputs into feature:1:3@2 weigh 1 (0:5@1), 3 (0:5@2), -0.5 (0:7@2) and 1.5 (error): total 6. Into
logit:10@2: 4 (1:3@2) and 1 (token@2): total 5. Each feature at layer 0 has one input (share 1).
"""

import pytest
from graph_helpers import hand_built_graph

from circuits.graph.compare import compare_graphs
from circuits.graph.paths import strongest_paths
from circuits.graph.queries import (
    NodeQuery,
    node_inputs,
    node_outputs,
    node_report,
    search_nodes,
    top_nodes,
)
from circuits.graph.subgraphs import influence_subgraph, neighbourhood, subgraph
from circuits.graph.supernodes import group_by_feature, group_by_label, merge_nodes
from dictionaries.errors import CircuitscopeError


@pytest.fixture
def graph():
    return hand_built_graph()


def test_strongest_paths_to_the_top_logit(graph):
    paths = strongest_paths(graph, k=10)
    assert [p.nodes for p in paths] == [
        ["token@2", "feature:0:5@2", "feature:1:3@2", "logit:10@2"],
        ["token@2", "logit:10@2"],
        ["token@1", "feature:0:5@1", "feature:1:3@2", "logit:10@2"],
        ["token@2", "feature:0:7@2", "feature:1:3@2", "logit:10@2"],
    ]
    assert [p.strength for p in paths] == pytest.approx([0.5 * 0.8, 0.2, 0.8 / 6, 0.8 / 12])
    assert [p.sign for p in paths] == [1, 1, 1, 1]  # the last one: two negative edges
    assert paths[3].weights == [-1.5, -0.5, 4.0]
    assert len(strongest_paths(graph, k=2)) == 2


def test_strongest_paths_to_a_named_target_and_sign(graph):
    paths = strongest_paths(graph, "logit:11@2", k=5)
    # into logit:11: -2 from token@1, +2 from 0:7@2 (shares 0.5 each); 0:7@2 has one input (-1.5)
    assert {tuple(p.nodes): (p.strength, p.sign) for p in paths} == {
        ("token@1", "logit:11@2"): (0.5, -1),
        ("token@2", "feature:0:7@2", "logit:11@2"): (0.5, -1),
    }
    with pytest.raises(CircuitscopeError, match="no node"):
        strongest_paths(graph, "feature:9:9@9")


def test_inputs_and_outputs_ranked_with_signs(graph):
    inputs = node_inputs(graph, "feature:1:3@2")
    assert [(c.node, c.weight, c.sign) for c in inputs] == [
        ("feature:0:5@2", 3.0, 1), ("error:0@2", 1.5, 1), ("feature:0:5@1", 1.0, 1), ("feature:0:7@2", -0.5, -1)]
    assert [c.share for c in inputs] == pytest.approx([0.5, 0.25, 1 / 6, 1 / 12])
    outputs = node_outputs(graph, "token@2")
    assert [(c.node, c.weight) for c in outputs] == [("feature:0:5@2", 3.0), ("feature:0:7@2", -1.5),
                                                     ("logit:10@2", 1.0)]
    assert [c.share for c in outputs] == pytest.approx([3 / 5.5, 1.5 / 5.5, 1 / 5.5])
    report = node_report(graph, "feature:1:3@2", top=2)
    assert [c.node for c in report.inputs] == ["feature:0:5@2", "error:0@2"]
    assert report.inputs[1].share == pytest.approx(0.25)  # shares of all inputs, not of the top two
    assert report.data["label"] == "animal" and report.data["children"] is None


def test_top_nodes(graph):
    assert top_nodes(graph, 1) == ["feature:1:3@2"]
    assert top_nodes(graph, 3, "feature") == ["feature:1:3@2", "feature:0:5@2", "feature:0:5@1"]
    assert top_nodes(graph, 5, "logit") == ["logit:10@2", "logit:11@2"]


def test_search(graph):
    assert search_nodes(graph, NodeQuery(label="ANIM")) == ["feature:1:3@2", "feature:0:5@2", "feature:0:5@1"]
    assert set(search_nodes(graph, NodeQuery(token="cat"))) == {
        "token@2", "feature:0:5@2", "feature:0:7@2", "feature:1:3@2", "error:0@2"}
    assert search_nodes(graph, NodeQuery(token="meow")) == ["logit:10@2"]
    assert search_nodes(graph, NodeQuery(layer=1)) == ["feature:1:3@2"]
    assert search_nodes(graph, NodeQuery(feature=5), order="id") == ["feature:0:5@1", "feature:0:5@2"]
    assert search_nodes(graph, NodeQuery(feature="0:5"), order="id") == ["feature:0:5@1", "feature:0:5@2"]
    assert search_nodes(graph, NodeQuery(feature="1:5")) == []
    assert search_nodes(graph, NodeQuery(kind="feature", token="cat", label="animal")) == [
        "feature:1:3@2", "feature:0:5@2"]
    with pytest.raises(CircuitscopeError, match="search term"):
        search_nodes(graph, NodeQuery())


def test_subgraphs(graph):
    sub = subgraph(graph, ["token@2", "feature:0:5@2", "feature:1:3@2"])
    assert sorted(sub.graph.edges) == [("feature:0:5@2", "feature:1:3@2"), ("token@2", "feature:0:5@2")]
    assert sub.metadata == graph.metadata
    # feature influence 0.5, 0.3, 0.1, 0.08 of 0.98: the top two reach 0.816 >= 0.8
    kept = influence_subgraph(graph, 0.8)
    assert {n for n in kept.graph if kept.graph.nodes[n]["kind"] == "feature"} == {"feature:1:3@2", "feature:0:5@2"}
    assert {"token@0", "token@1", "token@2", "error:0@2", "logit:10@2", "logit:11@2"} <= set(kept.graph)
    assert set(influence_subgraph(graph, 0.3).graph) == set(kept.graph) - {"feature:0:5@2"}
    absolute = influence_subgraph(graph, 0.1, cumulative=False)
    assert {n for n in absolute.graph if absolute.graph.nodes[n]["kind"] == "feature"} == {
        "feature:1:3@2", "feature:0:5@2", "feature:0:5@1"}
    with pytest.raises(CircuitscopeError, match=r"\(0, 1\]"):
        influence_subgraph(graph, 1.5)


def test_neighbourhood(graph):
    around = neighbourhood(graph, "feature:1:3@2", hops=1)
    assert set(around.graph) == {"feature:1:3@2", "feature:0:5@1", "feature:0:5@2", "feature:0:7@2", "error:0@2",
                                 "logit:10@2"}
    upstream = neighbourhood(graph, "feature:1:3@2", hops=2, direction="in")
    assert set(upstream.graph) == {"feature:1:3@2", "feature:0:5@1", "feature:0:5@2", "feature:0:7@2", "error:0@2",
                                   "token@1", "token@2"}
    assert set(neighbourhood(graph, "token@0", hops=3).graph) == {"token@0"}
    assert set(neighbourhood(graph, "feature:0:7@2", hops=1, direction="out").graph) == {
        "feature:0:7@2", "feature:1:3@2", "logit:11@2"}


def test_merge_one_feature_across_positions(graph):
    assert group_by_feature(graph) == {"0:5": ["feature:0:5@1", "feature:0:5@2"]}
    merged = merge_nodes(graph, group_by_feature(graph))
    node = merged.graph.nodes["supernode:0:5"]
    assert node["kind"] == "supernode" and node["children"] == ["feature:0:5@1", "feature:0:5@2"]
    assert node["feature_key"] == "0:5" and node["layer"] == 0 and node["position"] == 2
    assert node["influence"] == pytest.approx(0.4) and node["activation"] == pytest.approx(3.0)
    assert merged.graph.edges["supernode:0:5", "feature:1:3@2"]["weight"] == 4.0  # 1 + 3
    assert merged.graph.edges["token@1", "supernode:0:5"]["weight"] == 2.0
    assert "feature:0:5@1" not in merged.graph
    # the merged graph keeps the API: the best path now runs through the supernode, 4 of 6 of 1:3's input
    best = strongest_paths(merged, k=1)[0]
    assert best.nodes == ["token@2", "supernode:0:5", "feature:1:3@2", "logit:10@2"]
    assert best.strength == pytest.approx(3 / 5 * 4 / 6 * 0.8)
    assert node_inputs(merged, "feature:1:3@2")[0].node == "supernode:0:5"


def test_merge_by_label_drops_inner_edges_and_sums_the_rest(graph):
    merged = merge_nodes(graph, group_by_label(graph))
    assert set(merged.nodes_of_kind("supernode")) == {"supernode:animal"}
    inputs = {c.node: c.weight for c in node_inputs(merged, "supernode:animal")}
    assert inputs == {"token@1": 2.0, "token@2": 3.0, "feature:0:7@2": -0.5, "error:0@2": 1.5}
    assert {c.node: c.weight for c in node_outputs(merged, "supernode:animal")} == {"logit:10@2": 4.0}
    assert merged.graph.nodes["supernode:animal"]["feature_key"] is None


def test_merge_errors(graph):
    with pytest.raises(CircuitscopeError, match="two groups"):
        merge_nodes(graph, {"a": ["feature:0:5@1"], "b": ["feature:0:5@1"]})
    with pytest.raises(CircuitscopeError, match="no node"):
        merge_nodes(graph, {"a": ["nope"]})
    with pytest.raises(CircuitscopeError, match="no members"):
        merge_nodes(graph, {"a": []})


def test_merging_across_layers_that_feed_each_other_makes_paths_refuse(graph):
    looped = merge_nodes(graph, {"loop": ["feature:0:5@2", "error:0@2", "logit:10@2"], "b": ["feature:1:3@2",
                                                                                              "token@0"]})
    with pytest.raises(CircuitscopeError, match="cycle"):
        strongest_paths(looped, "supernode:b")


def test_compare_two_graphs(graph):
    result = compare_graphs(graph, hand_built_graph(variant=True))
    assert [f.feature_key for f in result.shared_features] == ["1:3", "0:5"]
    assert result.shared_features[1].positions_a == [1, 2]
    assert [f.feature_key for f in result.only_a] == ["0:7"]
    assert [f.feature_key for f in result.only_b] == ["1:9"]
    assert {(c.source, c.target) for c in result.vanished} == {
        ("token:cat", "feature:0:7"), ("feature:0:7", "feature:1:3"), ("feature:0:7", "logit: purr")}
    assert {(c.source, c.target) for c in result.appeared} == {
        ("token:cat", "feature:1:9"), ("feature:1:9", "logit: purr")}
    (changed,) = result.changed  # 0:5 -> 1:3 summed over positions: 1 + 3 = 4, then 1 + 2 = 3
    assert (changed.source, changed.target, changed.weight_a, changed.weight_b) == (
        "feature:0:5", "feature:1:3", 4.0, 3.0)
    assert changed.delta == -1.0
    assert result.feature_overlap == pytest.approx(2 / 4)
    assert result.same_prompt and result.same_dictionaries


def test_compare_a_graph_with_itself_and_by_node(graph):
    same = compare_graphs(graph, graph)
    assert not (same.only_a or same.only_b or same.appeared or same.vanished or same.changed)
    assert same.feature_overlap == same.edge_overlap == 1.0
    by_node = compare_graphs(graph, hand_built_graph(variant=True), match="node")
    (changed,) = by_node.changed
    assert (changed.source, changed.target, changed.delta) == ("feature:0:5@2", "feature:1:3@2", -1.0)
