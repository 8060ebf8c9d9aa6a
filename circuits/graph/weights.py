"""Edge weights seen relative to the graph: normalised weights and edge importance.

The normalised weight of edge s -> t is ``|A[t, s]| / sum_s' |A[t, s']|``, its share of everything that
flows into t within this graph (the row normalisation of :mod:`circuits.engine.influence`, but over the edges the
graph holds). Edge importance is ``normalised weight * (influence[t] + logit weight of t)``, the score by
which pruning ranks edges: how much of the logits' influence flows along the edge.
"""

from __future__ import annotations

from .attribution_graph import AttributionGraph

Edge = tuple[str, str]


def input_totals(graph: AttributionGraph) -> dict[str, float]:
    """Every node's total absolute input ``sum_s |A[t, s]|`` over the graph's edges (0 without inputs)."""
    totals = dict.fromkeys(graph.graph.nodes, 0.0)
    for _, t, weight in graph.graph.edges(data="weight"):
        totals[t] += abs(weight)
    return totals


def normalised_weights(graph: AttributionGraph) -> dict[Edge, float]:
    """Each edge's share of its target's total absolute input, in [0, 1]."""
    totals = input_totals(graph)
    return {(s, t): abs(w) / totals[t] if totals[t] else 0.0 for s, t, w in graph.graph.edges(data="weight")}


def logit_weight(graph: AttributionGraph, node: str) -> float:
    """The weight a node carries as an attribution target: a logit's probability (1 for a logit difference);
    0 for every other node."""
    data = graph.nodes[node]
    if data["kind"] != "logit":
        return 0.0
    if graph.metadata.settings.logit_diff is not None:
        return 1.0
    return float(data.get("probability") or 0.0)


def edge_importance(graph: AttributionGraph) -> dict[Edge, float]:
    """Each edge's normalised weight times its target's influence plus logit weight."""
    nodes = graph.graph.nodes
    return {
        (s, t): share * (nodes[t]["influence"] + logit_weight(graph, t))
        for (s, t), share in normalised_weights(graph).items()
    }
