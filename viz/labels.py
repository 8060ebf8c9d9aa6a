"""How a node is named on screen: a short label (two lines at most) and a longer description.

Shared by the SVG, the HTML page and the CLI's tables, so a node reads the same everywhere.
"""

from __future__ import annotations

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.node_kinds import node_kind, show_token


def position_token(graph: AttributionGraph, position: int) -> str | None:
    tokens = graph.metadata.tokens
    return tokens[position] if 0 <= position < len(tokens) else None


def node_label(graph: AttributionGraph, node: str) -> tuple[str, str]:
    """Two short lines: what the node is, and where (its token), e.g. ("L3 #17", "“ Paris”")."""
    data = graph.graph.nodes[node]
    return node_kind(data["kind"]).label(node, data, show_token(position_token(graph, data["position"])))


def node_description(graph: AttributionGraph, node: str) -> str:
    """One line with everything a reader wants on hover: id, kind, layer, position, numbers."""
    data = graph.graph.nodes[node]
    parts = [node, data["kind"], f"layer {data['layer']}", f"position {data['position']}"]
    if data.get("label"):
        parts.append(f"label {data['label']!r}")
    for key in ("activation", "influence", "probability", "value"):
        if data.get(key) is not None:
            parts.append(f"{key} {data[key]:.4g}")
    if data.get("members") is not None:
        parts.append(f"{data['members']} features folded")
    if data.get("children"):
        parts.append(f"merges {len(data['children'])} nodes")
    return " | ".join(parts)
