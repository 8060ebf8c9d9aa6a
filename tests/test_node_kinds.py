"""A new kind of graph node is one registration: the graph file, queries, comparisons, exports, drawings and labels
all follow the table in circuits.graph.node_kinds."""

from __future__ import annotations

import json

import pytest
from graph_helpers import FEATURE_FIELDS, hand_built_graph

from circuits.graph import node_kinds
from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.compare import node_identity
from circuits.graph.neuronpedia import to_neuronpedia
from circuits.graph.queries import top_nodes
from circuits.graph.subgraphs import influence_subgraph
from dictionaries.errors import CircuitscopeError
from viz.html import PageOptions, page_data
from viz.labels import node_label
from viz.selection import DrawLimits, select

PROBE = node_kinds.NodeKindInfo(
    "probe", ranked=False, always_drawn=True, identity=lambda node, data: f"probe:{data['label']}",
    label=lambda node, data, here: (f"probe {data['label']}", here), neuronpedia_type="linear probe",
    shape="hexagon", fill="#ff00aa")


@pytest.fixture
def probe_graph():
    node_kinds.register_node_kind(PROBE)
    try:
        graph = hand_built_graph()
        graph.graph.add_node("probe:animal@2", **{**FEATURE_FIELDS, "kind": "probe", "layer": 1, "position": 2,
                                                  "influence": 0.0001, "label": "animal"})
        graph.graph.add_edge("feature:1:3@2", "probe:animal@2", weight=0.7)
        yield graph
    finally:
        node_kinds._KINDS.pop("probe")


def test_a_registered_kind_flows_through_files_queries_exports_and_drawings(probe_graph, tmp_path):
    loaded = AttributionGraph.load(probe_graph.save(tmp_path / "g.json"))
    assert loaded.graph.nodes["probe:animal@2"]["kind"] == "probe"
    assert loaded.nodes_of_kind("probe") == ["probe:animal@2"]
    assert top_nodes(loaded, 5, "probe") == ["probe:animal@2"]

    data = loaded.graph.nodes["probe:animal@2"]
    assert node_identity("probe:animal@2", data) == "probe:animal"
    assert node_label(loaded, "probe:animal@2") == ("probe animal", "“cat”")

    # not ranked: an influence threshold that drops the weakest features keeps it (its influence is the smallest)
    assert "probe:animal@2" in influence_subgraph(loaded, 0.5).graph
    # always drawn: even a drawing limited to one node shows it
    assert "probe:animal@2" in select(loaded, DrawLimits(max_nodes=1)).nodes

    exported = {n.node_id: n for n in to_neuronpedia(loaded).nodes}
    assert [n.feature_type for n in exported.values() if n.clerp == "animal" and n.layer == "1"
            and n.feature_type != "cross layer transcoder"] == ["linear probe"]

    page = page_data(loaded, PageOptions())
    assert page["kinds"]["probe"] == {"shape": "hexagon", "fill": "#ff00aa", "mark": False}
    assert "probe" in json.dumps([n["kind"] for n in page["nodes"]])


def test_the_svg_draws_a_registered_kind_with_its_shape_and_fill(probe_graph):
    from viz.svg import to_dot

    source = to_dot(probe_graph).source
    line = next(line for line in source.splitlines() if "probe animal" in line)
    assert "shape=hexagon" in line and "#ff00aa" in line


def test_an_unknown_kind_is_refused_with_the_known_ones(tmp_path):
    raw = json.loads(hand_built_graph().to_json())
    next(n for n in raw["nodes"] if n["id"] == "error:0@2")["kind"] = "mystery"
    path = tmp_path / "g.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(CircuitscopeError, match="unknown node kind 'mystery'; known kinds: token, feature"):
        AttributionGraph.load(path)
