"""Slices of a graph: by node ids, by influence, or the neighbourhood of a node.

Each returns a new :class:`~circuits.graph.attribution_graph.AttributionGraph` (the induced subgraph, with the same
metadata; scores in the metadata still describe the graph it came from) so every query works on it.
The ``unpruned`` section is not carried over: it belongs to the whole graph.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import networkx as nx

from dictionaries.errors import CircuitscopeError

from .attribution_graph import AttributionGraph
from .lookup import require_node
from .node_kinds import node_kind


def subgraph(graph: AttributionGraph, nodes: Iterable[str]) -> AttributionGraph:
    """The induced subgraph on ``nodes`` (every id must exist)."""
    nodes = list(nodes)
    for node in nodes:
        require_node(graph, node)
    return AttributionGraph(graph.graph.subgraph(nodes).copy(), graph.metadata)


def cumulative_influence(graph: AttributionGraph, nodes: Iterable[str]) -> dict[str, float]:
    """For each of ``nodes``: the share of their total influence held by the nodes at least as influential
    as it (in (0, 1]; the most influential node has the smallest value). Keeping the nodes whose value is at
    most ``t`` keeps the smallest set that reaches ``t`` of the influence, as pruning does."""
    ranked = sorted(nodes, key=lambda v: -graph.nodes[v]["influence"])
    total = sum(max(graph.nodes[v]["influence"], 0.0) for v in ranked)
    out, running = {}, 0.0
    for v in ranked:
        running += max(graph.nodes[v]["influence"], 0.0)
        out[v] = running / total if total > 0 else 1.0
    return out


def influence_subgraph(graph: AttributionGraph, threshold: float, cumulative: bool = True) -> AttributionGraph:
    """Tokens, errors and logits, plus the features (remainders, supernodes) that matter most.

    ``cumulative``: keep the smallest set of them whose influence reaches ``threshold`` (in (0, 1]) of their
    total, as pruning does; otherwise keep those whose own influence is at least ``threshold``.
    """
    ranked = [n for n, kind in graph.graph.nodes(data="kind") if node_kind(kind).ranked]
    if cumulative:
        if not 0.0 < threshold <= 1.0:
            raise CircuitscopeError(f"a cumulative influence threshold lies in (0, 1], got {threshold}")
        kept = set()
        for node, share in cumulative_influence(graph, ranked).items():  # most influential first
            kept.add(node)
            if share >= threshold:
                break
    else:
        kept = {v for v in ranked if graph.nodes[v]["influence"] >= threshold}
    return subgraph(graph, [n for n, kind in graph.graph.nodes(data="kind") if not node_kind(kind).ranked or n in kept])


def neighbourhood(graph: AttributionGraph, node: str, hops: int = 1,
                  direction: Literal["both", "in", "out"] = "both") -> AttributionGraph:
    """The nodes within ``hops`` edges of ``node`` (following edges into it, out of it, or both)."""
    require_node(graph, node)
    if hops < 0:
        raise CircuitscopeError(f"hops must be >= 0, got {hops}")
    view = {"both": graph.graph.to_undirected(as_view=True), "out": graph.graph,
            "in": graph.graph.reverse(copy=False)}[direction]
    return subgraph(graph, nx.single_source_shortest_path_length(view, node, cutoff=hops))
