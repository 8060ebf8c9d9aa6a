"""The strongest paths from token nodes to a target node.

A path's strength is the product of the normalised weights of its edges (see :mod:`circuits.graph.weights`):
the fraction of the target's input that arrives along that path, when every node passes on its input in
proportion to its absolute incoming weights. Its sign is the product of the edges' signs. The graph is
layered, so one sweep in topological order keeps the k best partial paths into every node and finds the
exact top k (no enumeration of all paths).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx

from dictionaries.errors import CircuitscopeError

from .attribution_graph import AttributionGraph
from .lookup import require_node, top_logit
from .weights import normalised_weights


@dataclass(frozen=True)
class GraphPath:
    """One path: ``nodes[0]`` (a source) to ``nodes[-1]`` (the target), with every edge's raw weight."""

    nodes: list[str]
    weights: list[float]
    strength: float  # product of the normalised edge weights, in [0, 1]
    sign: int  # +1 or -1: the product of the edges' signs


def strongest_paths(graph: AttributionGraph, target: str | None = None, k: int = 5,
                    sources: Iterable[str] | None = None) -> list[GraphPath]:
    """The ``k`` strongest paths from any of ``sources`` (default: the token nodes) to ``target``
    (default: the most likely logit), strongest first."""
    if k < 1:
        raise CircuitscopeError(f"k must be at least 1, got {k}")
    target = target or top_logit(graph)
    require_node(graph, target)
    starts = set(graph.nodes_of_kind("token") if sources is None else sources)
    for node in starts:
        require_node(graph, node)
    relevant = nx.ancestors(graph.graph, target) | {target}
    sub = graph.graph.subgraph(relevant)
    try:
        order = list(nx.topological_sort(sub))
    except nx.NetworkXUnfeasible:
        raise CircuitscopeError("the graph has a cycle (a supernode spans layers that feed each other); "
                                "path queries need an acyclic graph: merge nodes of one layer only") from None
    share = normalised_weights(graph)
    # best[v]: up to k entries (strength, sign, node, parent entry), a linked list back to a source
    best: dict[str, list[tuple]] = {}
    for v in order:
        candidates = [(1.0, 1, v, None)] if v in starts else []
        for u in sub.predecessors(v):
            w = sub.edges[u, v]["weight"]
            step, sign = share[u, v], (1 if w >= 0 else -1)
            candidates += [(entry[0] * step, entry[1] * sign, v, entry) for entry in best.get(u, ())]
        if candidates:
            best[v] = heapq.nlargest(k, candidates, key=lambda e: e[0])
    return [_unwind(graph, entry) for entry in best.get(target, [])]


def _unwind(graph: AttributionGraph, entry: tuple) -> GraphPath:
    strength, sign, _, _ = entry
    nodes = []
    while entry is not None:
        nodes.append(entry[2])
        entry = entry[3]
    nodes.reverse()
    weights = [graph.graph.edges[u, v]["weight"] for u, v in itertools.pairwise(nodes)]
    return GraphPath(nodes=nodes, weights=weights, strength=strength, sign=sign)
