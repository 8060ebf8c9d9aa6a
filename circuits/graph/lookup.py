"""Finding nodes: the check that a node exists, and the default target of path queries."""

from __future__ import annotations

from dictionaries.errors import CircuitscopeError

from .attribution_graph import AttributionGraph


def require_node(graph: AttributionGraph, node: str) -> None:
    """Raise a clear error when ``node`` is not a node of ``graph``."""
    if node not in graph.nodes:
        raise CircuitscopeError(f"no node {node!r} in the graph; list nodes with `circuitscope query GRAPH top`")


def top_logit(graph: AttributionGraph) -> str:
    """The logit node with the highest probability."""
    logits = graph.logit_nodes
    if not logits:
        raise CircuitscopeError("the graph has no logit nodes; name a target node")
    return max(logits, key=lambda n: graph.nodes[n].get("probability") or 0.0)
