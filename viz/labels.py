"""How a node is named on screen: a label (what the node is, and where: its token) and a longer description.

Shared by the SVG, the HTML page and the CLI's tables, so a node reads the same everywhere. The tables show the
label in full; the drawings show :func:`drawn_lines`: the label wrapped on word boundaries and with the characters
the drawing's font lacks escaped (:mod:`viz.wrapping`, :mod:`viz.glyphs`).
"""

from __future__ import annotations

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.node_kinds import node_kind, show_token

from .glyphs import drawable_text
from .wrapping import wrap_label


def position_token(graph: AttributionGraph, position: int) -> str | None:
    tokens = graph.tokens
    return tokens[position] if 0 <= position < len(tokens) else None


def node_label(graph: AttributionGraph, node: str) -> tuple[str, str]:
    """Two lines: what the node is, and where (its token), e.g. ("L3 #17", "“ Paris”")."""
    data = graph.nodes[node]
    return node_kind(data["kind"]).label(node, data, show_token(position_token(graph, data["position"])))


def drawn_lines(graph: AttributionGraph, node: str, width: int, max_lines: int) -> list[str]:
    """The node's label as a drawing shows it: what it is in at most ``max_lines`` lines of about ``width``
    characters, then where, all in characters the drawing's font has."""
    what, where = node_label(graph, node)
    return wrap_label(drawable_text(what), width, max_lines) + [drawable_text(where)]


def node_description(graph: AttributionGraph, node: str) -> str:
    """One line with everything a reader wants on hover: id, kind, layer, position, numbers."""
    data = graph.nodes[node]
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
