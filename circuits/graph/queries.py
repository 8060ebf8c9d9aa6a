"""Questions about single nodes: what drives a node and what it drives, the most influential nodes, and
search by label, token, layer, feature or kind.

Paths live in :mod:`circuits.graph.paths`, subgraphs in :mod:`circuits.graph.subgraphs`, merging in
:mod:`circuits.graph.supernodes` and comparison in :mod:`circuits.graph.compare`. Every query takes an
:class:`~circuits.graph.attribution_graph.AttributionGraph` (a merged or sliced one too) and returns plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dictionaries.errors import CircuitscopeError

from .attribution_graph import AttributionGraph, NodeData, NodeKind
from .lookup import require_node


@dataclass(frozen=True)
class Contribution:
    """One edge seen from a node: the node at its other end, the raw weight (sign included) and the edge's
    share of the absolute weights on that side of the node (``share``, in [0, 1])."""

    node: str
    weight: float
    share: float

    @property
    def sign(self) -> int:
        return 1 if self.weight >= 0 else -1


@dataclass(frozen=True)
class NodeReport:
    """A node's attributes, its direct inputs and the nodes it drives, each ranked by absolute weight."""

    id: str
    data: dict
    inputs: list[Contribution]
    outputs: list[Contribution]


def _ranked(edges: list[tuple[str, float]], top: int | None) -> list[Contribution]:
    total = sum(abs(w) for _, w in edges)
    ranked = sorted(edges, key=lambda e: -abs(e[1]))[:top]
    return [Contribution(node, w, abs(w) / total if total else 0.0) for node, w in ranked]


def node_inputs(graph: AttributionGraph, node: str, top: int | None = None) -> list[Contribution]:
    """The direct contributors to ``node`` (edges into it), strongest first."""
    require_node(graph, node)
    return _ranked(graph.in_edges(node), top)


def node_outputs(graph: AttributionGraph, node: str, top: int | None = None) -> list[Contribution]:
    """The nodes that ``node`` drives directly (edges out of it), strongest first."""
    require_node(graph, node)
    return _ranked(graph.out_edges(node), top)


def node_report(graph: AttributionGraph, node: str, top: int | None = None) -> NodeReport:
    """Everything about one node: attributes, ranked inputs and outputs."""
    require_node(graph, node)
    data = NodeData(id=node, **graph.nodes[node]).model_dump(exclude={"id"})
    return NodeReport(node, data, node_inputs(graph, node, top), node_outputs(graph, node, top))


def top_nodes(graph: AttributionGraph, n: int = 20, kind: NodeKind | None = None) -> list[str]:
    """The ``n`` nodes of highest influence on the logits (of one ``kind`` if given)."""
    nodes = graph.nodes_of_kind(kind) if kind else list(graph.nodes)
    return sorted(nodes, key=lambda v: -graph.nodes[v]["influence"])[:n]


@dataclass(frozen=True)
class NodeQuery:
    """Search terms; a node must match every term given. ``label`` and ``token`` match case-insensitive
    substrings (``token``: the prompt token at the node's position, or a logit's token); ``feature`` is a
    feature index (any layer) or a position-independent ``feature_key`` such as ``"3:17"``."""

    label: str | None = None
    token: str | None = None
    layer: int | None = None
    feature: int | str | None = None
    kind: NodeKind | None = None


def _token_text(graph: AttributionGraph, data: dict) -> str:
    if data["kind"] == "logit" or data.get("token") is not None:
        return data.get("token") or ""
    tokens = graph.tokens
    return tokens[data["position"]] if 0 <= data["position"] < len(tokens) else ""


def _matches(graph: AttributionGraph, data: dict, query: NodeQuery) -> bool:
    if query.kind is not None and data["kind"] != query.kind:
        return False
    if query.layer is not None and data["layer"] != query.layer:
        return False
    if query.label is not None and query.label.lower() not in (data.get("label") or "").lower():
        return False
    if query.token is not None and query.token.lower() not in _token_text(graph, data).lower():
        return False
    if isinstance(query.feature, int) and data.get("feature") != query.feature:
        return False
    return not (isinstance(query.feature, str) and data.get("feature_key") != query.feature)


def search_nodes(graph: AttributionGraph, query: NodeQuery, order: Literal["influence", "id"] = "influence"
                 ) -> list[str]:
    """Ids of the nodes matching ``query``, most influential first (or sorted by id)."""
    if query == NodeQuery():
        raise CircuitscopeError("give at least one search term (label, token, layer, feature or kind)")
    found = [n for n, data in graph.nodes.items() if _matches(graph, data, query)]
    if order == "id":
        return sorted(found)
    return sorted(found, key=lambda v: -graph.nodes[v]["influence"])
