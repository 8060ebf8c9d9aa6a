"""A graph's attention in one JSON-ready record: what the HTML page shows for a selected edge (docs/design.md §3.11).

For the edges :func:`.heads.annotate_edges` annotated (the strongest cross-position edges), each edge's head routes
``(layer, head, signed share)``; for the ``qk_edges`` strongest of them, the QK attribution (:mod:`.qk`) of each of
those heads where the edge's target position queries and its source position is the key: the score, its top pairs
of sources, the top query-side and key-side marginals and the bias terms. Node ids are the graph's; a QK source
need not be a node of the (pruned) graph.
"""

from __future__ import annotations

from dataclasses import asdict

from pydantic import BaseModel, ConfigDict, Field

from .heads import EdgeHeadRoutes
from .qk import AttentionQueries, QKAttribution
from .state import TraceState


class EdgeAttention(BaseModel):
    """One annotated edge: ``weight`` as the graph stores it, ``recomputed`` from the rerun, ``heads`` [(layer,
    head, share)] largest |share| first; ``qk`` one attribution per head of ``heads``, in that order (empty for an
    edge outside the strongest ``qk_edges``)."""

    model_config = ConfigDict(extra="forbid")

    source: str
    target: str
    weight: float
    recomputed: float
    heads: list[tuple[int, int, float]]
    qk: list[QKAttribution] = Field(default_factory=list)


class AttentionSummary(BaseModel):
    """The annotated edges (strongest |weight| first), QK for the ``qk_edges`` strongest of them that have head
    routes, with ``qk_top`` pairs and marginals per side."""

    model_config = ConfigDict(extra="forbid")

    qk_edges: int = Field(ge=0)
    qk_top: int = Field(ge=1)
    edges: list[EdgeAttention]


def attention_summary(state: TraceState, routes: list[EdgeHeadRoutes], qk_edges: int = 20,
                      top: int = 10) -> AttentionSummary:
    """The summary of ``routes`` (from :func:`.heads.annotate_edges` on ``state``) with QK for the
    ``qk_edges`` strongest edges that have head routes, ``top`` pairs and marginals each."""
    queries = AttentionQueries(state)
    ordered = sorted(routes, key=lambda r: -abs(r.weight))
    with_qk = {(r.source, r.target) for r in [r for r in ordered if r.heads][:qk_edges]}
    edges = []
    for route in ordered:
        qk = []
        if (route.source, route.target) in with_qk:
            query, key = state.node(route.target).position, state.node(route.source).position
            qk = [queries.attribute(layer, head, query, key, top) for layer, head, _ in route.heads]
        edges.append(EdgeAttention(**asdict(route), qk=qk))
    return AttentionSummary(qk_edges=qk_edges, qk_top=top, edges=edges)
