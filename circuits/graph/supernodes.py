"""Supernodes: merge groups of nodes into one node each.

A group (a name and its member ids) becomes the node ``supernode:{name}`` of kind ``supernode``, whose
``children`` lists the members. Edges into and out of the group are summed (several members fed by one
source give one edge with the sum of their weights); edges between members disappear. The merged node's
``influence`` and ``activation`` are the members' sums; ``layer`` is the members' mean layer (rounded) and
``position`` their last position; ``feature`` and ``feature_key`` stay when every member is the same
feature, so comparisons by feature identity still see it. Nodes outside every group are untouched, and the
result is an ordinary :class:`~circuits.graph.attribution_graph.AttributionGraph` that every query accepts.

Groupings: a user's mapping, :func:`group_by_feature` (one feature across positions) or
:func:`group_by_label` (nodes that share a label). Groups of one node are left alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import networkx as nx

from dictionaries.errors import CircuitscopeError

from .attribution_graph import AttributionGraph
from .lookup import require_node

SUPERNODE_PREFIX = "supernode:"


def merge_nodes(graph: AttributionGraph, groups: Mapping[str, Iterable[str]]) -> AttributionGraph:
    """A new graph in which every group of ``groups`` (name -> member ids) is one supernode."""
    owner: dict[str, str] = {}
    members_of: dict[str, list[str]] = {}
    for name, members in groups.items():
        members = list(dict.fromkeys(members))
        if not members:
            raise CircuitscopeError(f"supernode {name!r} has no members")
        for node in members:
            require_node(graph, node)
            if node in owner:
                raise CircuitscopeError(f"node {node!r} is in two groups ({owner[node]!r} and {name!r})")
            owner[node] = SUPERNODE_PREFIX + name
        members_of[SUPERNODE_PREFIX + name] = members

    merged = nx.DiGraph()
    for node, data in graph.graph.nodes(data=True):
        if node not in owner:
            merged.add_node(node, **data)
    for node, members in members_of.items():
        merged.add_node(node, **_merged_attributes(graph, node.removeprefix(SUPERNODE_PREFIX), members))
    weights: dict[tuple[str, str], float] = defaultdict(float)
    for s, t, w in graph.graph.edges(data="weight"):
        s, t = owner.get(s, s), owner.get(t, t)
        if s != t:
            weights[s, t] += w
    merged.add_edges_from((s, t, {"weight": w}) for (s, t), w in weights.items())
    return AttributionGraph(merged, graph.metadata)


def _merged_attributes(graph: AttributionGraph, name: str, members: list[str]) -> dict:
    data = [graph.graph.nodes[m] for m in members]
    keys = {d.get("feature_key") for d in data}
    one_feature = len(keys) == 1 and None not in keys
    activations = [d.get("activation") for d in data if d.get("activation") is not None]
    probabilities = [d.get("probability") for d in data if d.get("probability") is not None]
    return {
        "kind": "supernode",
        "layer": round(sum(d["layer"] for d in data) / len(data)),
        "position": max(d["position"] for d in data),
        "feature": data[0]["feature"] if one_feature else None,
        "feature_key": data[0]["feature_key"] if one_feature else None,
        "token": None,
        "token_id": None,
        "activation": sum(activations) if activations else None,
        "influence": sum(d["influence"] for d in data),
        "label": name,
        "probability": sum(probabilities) if len(probabilities) == len(data) else None,
        "members": None,
        "value": None,
        "children": members,
    }


def group_by_feature(graph: AttributionGraph) -> dict[str, list[str]]:
    """One group per feature that is active at several positions, named by its ``feature_key``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for node, key in graph.graph.nodes(data="feature_key"):
        if key is not None and graph.graph.nodes[node]["kind"] == "feature":
            groups[key].append(node)
    return {key: nodes for key, nodes in groups.items() if len(nodes) > 1}


def group_by_label(graph: AttributionGraph) -> dict[str, list[str]]:
    """One group per label that several nodes share."""
    groups: dict[str, list[str]] = defaultdict(list)
    for node, label in graph.graph.nodes(data="label"):
        if label:
            groups[label].append(node)
    return {label: nodes for label, nodes in groups.items() if len(nodes) > 1}
