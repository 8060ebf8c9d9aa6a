"""QK attributions for the Neuronpedia export: the schema's per-node ``qk_tracing_results``.

The schema keeps one QK result per node. For the targets of a graph's strongest cross-position edges (each target
once, strongest edge first) we attribute the score of the edge's strongest head route (:mod:`.heads`): the target's
position attends to the source's, at that head's layer. Node ids are written as the export writes them.
"""

from __future__ import annotations

from ..graph.attribution_graph import AttributionGraph
from ..graph.neuronpedia import NPQKTracing, neuronpedia_id
from .heads import EdgeHeadRoutes
from .qk import AttentionQueries
from .state import TraceState


def neuronpedia_qk(state: TraceState, graph: AttributionGraph, routes: list[EdgeHeadRoutes], n_nodes: int = 10,
                   top: int = 10) -> dict[str, NPQKTracing]:
    """Graph node id -> its QK results, for up to ``n_nodes`` targets of ``routes`` (see the module docstring)."""
    queries = AttentionQueries(state)
    out: dict[str, NPQKTracing] = {}
    for route in sorted(routes, key=lambda r: -abs(r.weight)):
        if len(out) == n_nodes:
            break
        if route.target in out or not route.heads:
            continue
        layer, head, _ = route.heads[0]
        query, key = state.node(route.target).position, state.node(route.source).position
        result = queries.attribute(layer, head, query, key, top)

        def np_id(node: str) -> str:
            return neuronpedia_id(graph, node)

        out[route.target] = NPQKTracing(
            pair_wise_contributors=[(np_id(p.query_source), np_id(p.key_source), p.weight) for p in result.pairs],
            top_q_marginal_contributors=[(np_id(n), w) for n, w in result.query_marginals],
            top_k_marginal_contributors=[(np_id(n), w) for n, w in result.key_marginals],
        )
    return out
