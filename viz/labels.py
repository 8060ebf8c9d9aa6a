"""How a node is named on screen: a short label (two lines at most) and a longer description.

Shared by the SVG, the HTML page and the CLI's tables, so a node reads the same everywhere.
"""

from __future__ import annotations

from circuits.graph.attribution_graph import AttributionGraph


def show_token(text: str | None, limit: int = 14) -> str:
    """A token as it is shown: quoted, whitespace made visible, cut to ``limit`` characters."""
    text = (text or "").replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"“{text}”"


def _cut(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def position_token(graph: AttributionGraph, position: int) -> str | None:
    tokens = graph.metadata.tokens
    return tokens[position] if 0 <= position < len(tokens) else None


def node_label(graph: AttributionGraph, node: str) -> tuple[str, str]:
    """Two short lines: what the node is, and where (its token), e.g. ("L3 #17", "“ Paris”")."""
    data = graph.graph.nodes[node]
    kind, layer = data["kind"], data["layer"]
    here = show_token(position_token(graph, data["position"]))
    if kind == "token":
        return show_token(data.get("token")), f"@{data['position']}"
    if kind == "logit":
        return f"logit {show_token(data.get('token'))}", f"p={data.get('probability') or 0:.3f}"
    if kind == "feature":
        return _cut(data.get("label") or f"L{layer} #{data.get('feature')}"), here
    if kind == "error":
        return f"error L{layer}", here
    if kind == "remainder":
        return f"rest L{layer} ({data.get('members')})", here
    return _cut(data.get("label") or node), f"{len(data.get('children') or [])} nodes"


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
