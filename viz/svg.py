"""SVG through graphviz: layers bottom to top, token positions left to right.

Nodes are placed by :func:`viz.selection.layout` and handed to graphviz's ``neato -n2`` (which keeps the
given positions and only routes the edges), with the shape and fill of their kind (from
:mod:`circuits.graph.node_kinds`: tokens and logits boxes, features ellipses, ...). A node's label shows the
feature's label (or layer and index) wrapped on word boundaries, then its token; characters the font lacks are
escaped (:func:`viz.labels.drawn_lines`); hovering shows the full description. Errors are small diamonds, one per
(layer, position), sized by influence, and only where they are as influential as the drawn features. Edges are blue
when positive and red when negative, their width grows with the absolute weight.

What is drawn is chosen by ``DrawLimits`` (:mod:`viz.selection`). By default: the 80 most influential features,
each node's 3 strongest inputs (by normalised weight, at least 2% of its input) and of those the 150 most
important edges; the caption says what is drawn and how much is hidden.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import graphviz

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.node_kinds import node_kind
from dictionaries.atomic_output import write_text_atomic
from dictionaries.errors import CircuitscopeError

from .glyphs import drawable_text, visible_text
from .labels import drawn_lines, node_description
from .palette import NEGATIVE, POSITIVE
from .selection import DrawLimits, Grid, Selection, layout, select

INSTALL_GRAPHVIZ = ("the graphviz program `neato` is not installed; install graphviz "
                    "(Debian/Ubuntu: apt-get install graphviz, macOS: brew install graphviz, "
                    "conda: conda install -c conda-forge graphviz)")
FONT_SIZE = 8  # points
MARK_SIZE = (6.0, 14.0)  # the weakest and the strongest mark's width, points


def _escape(text: str) -> str:
    """Text for a graphviz string: backslashes are escape characters there, and ``&name;`` an entity."""
    return text.replace("\\", "\\\\").replace("&", "&amp;")


def _caption(graph: AttributionGraph, chosen: Selection, limits: DrawLimits) -> str:
    meta = graph.metadata
    kinds = sorted({graph.nodes[m]["kind"] for members in chosen.marks.values() for m in members})
    marks = f", {len(chosen.marks)} {'/'.join(kinds) or 'error'} marks" if chosen.marks else ""
    return (f"{meta.prompt!r} | {meta.model} | replacement {meta.scores.replacement:.3f}, completeness "
            f"{meta.scores.completeness:.3f}\n{len(chosen.nodes)} nodes{marks}, {len(chosen.edges)} edges drawn "
            f"(each node's {limits.edges_per_node} strongest inputs of at least {limits.min_edge_share:.0%}, at most "
            f"{limits.max_edges}); {chosen.hidden_nodes} nodes, {chosen.hidden_edges} edges hidden")


def to_dot(graph: AttributionGraph, limits: DrawLimits | None = None, grid: Grid | None = None) -> graphviz.Digraph:
    """The graphviz description of the drawing (positions fixed; render with ``neato -n2``)."""
    limits, grid = limits or DrawLimits(), grid or Grid()
    chosen = select(graph, limits)
    lines = {node: drawn_lines(graph, node, grid.label_width, grid.label_lines) for node in chosen.nodes}
    grid = grid.with_room_for(max((len(v) for v in lines.values()), default=2))
    placement = layout(graph, chosen.nodes, grid, list(chosen.marks))
    height = placement.height
    dot = graphviz.Digraph(engine="neato")
    caption = "\\n".join(_escape(drawable_text(line)) for line in _caption(graph, chosen, limits).split("\n"))
    dot.attr(label=caption, labelloc="t",
             fontsize="11", fontname="Helvetica", splines="curved", outputorder="edgesfirst", bgcolor="white",
             pad="0.3")
    dot.attr("node", style="filled", fontname="Helvetica", fontsize=str(FONT_SIZE), fixedsize="shape",
             width=f"{(grid.slot_width - 8) / 72:.3f}", height=f"{(grid.slot_height - 10) / 72:.3f}",
             color="#4a5568", penwidth="0.8")
    for layer, y in placement.band_centre.items():  # the layer axis, left of the first position
        name = {-1: "tokens", graph.metadata.n_layers: "logits"}.get(layer, f"L{layer}")
        dot.node(f"axis{layer}", label=name, shape="plaintext", style="solid", fontsize="10", fontcolor="#718096",
                 pos=f"{-grid.column_gap - 10:.1f},{height - y:.1f}!", **{"class": "axis"})
    names: dict[str, str] = {}
    for i, node in enumerate(chosen.nodes):
        names[node] = f"n{i}"
        data = graph.nodes[node]
        kind = node_kind(data["kind"])
        x, y = placement.where[node]
        dot.node(names[node], label="\\n".join(_escape(line) for line in lines[node]), shape=kind.shape,
                 fillcolor=kind.fill, pos=f"{x:.1f},{height - y:.1f}!",
                 tooltip=_escape(visible_text(node_description(graph, node))), **{"class": data["kind"]})
    _draw_marks(dot, graph, chosen, placement.marks, height, names)
    _draw_edges(dot, graph, chosen, names)
    return dot


def _draw_marks(dot: graphviz.Digraph, graph: AttributionGraph, chosen: Selection,
                where: dict[tuple[int, int], tuple[float, float]], height: float, names: dict[str, str]) -> None:
    """One small shape per marked cell, its width growing with the square root of its influence."""
    nodes = graph.graph.nodes
    influence = {cell: sum(nodes[m]["influence"] for m in members) for cell, members in chosen.marks.items()}
    strongest = max(influence.values(), default=1.0) or 1.0
    smallest, largest = MARK_SIZE
    for i, (cell, members) in enumerate(chosen.marks.items()):
        name = f"m{i}"
        names.update(dict.fromkeys(members, name))
        kind = node_kind(nodes[members[0]]["kind"])
        size = smallest + (largest - smallest) * math.sqrt(max(influence[cell], 0.0) / strongest)
        x, y = where[cell]
        tooltip = " ;; ".join(visible_text(node_description(graph, m)) for m in members)
        dot.node(name, label="", shape=kind.shape, fillcolor=kind.fill, fixedsize="true", width=f"{size / 72:.3f}",
                 height=f"{size / 72:.3f}", pos=f"{x:.1f},{height - y:.1f}!", tooltip=_escape(tooltip),
                 **{"class": "mark " + " ".join(sorted({nodes[m]["kind"] for m in members}))})


def _draw_edges(dot: graphviz.Digraph, graph: AttributionGraph, chosen: Selection, names: dict[str, str]) -> None:
    """The chosen edges between the drawn shapes (edges of one mark's members to one target summed), the most
    important drawn last, on top."""
    drawn: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for s, t in chosen.edges:
        drawn.setdefault((names[s], names[t]), []).append((s, t))
    weights = {pair: sum(graph.graph.edges[e]["weight"] for e in edges) for pair, edges in drawn.items()}
    biggest = max((abs(w) for w in weights.values()), default=1.0) or 1.0
    for (a, b), edges in reversed(drawn.items()):
        w = weights[a, b]
        tooltip = "; ".join(f"{s} → {t}: {graph.graph.edges[s, t]['weight']:+.4g}" for s, t in edges)
        dot.edge(a, b, color=POSITIVE if w >= 0 else NEGATIVE, penwidth=f"{0.3 + 3.7 * abs(w) / biggest:.2f}",
                 arrowsize="0.4", tooltip=_escape(visible_text(tooltip)))


def require_graphviz() -> None:
    """Fail early, with the install hint, when graphviz's ``neato`` is not on the PATH."""
    if shutil.which("neato") is None:
        raise CircuitscopeError(INSTALL_GRAPHVIZ)


def render_svg(graph: AttributionGraph, limits: DrawLimits | None = None) -> str:
    """The drawing as SVG text."""
    try:
        return to_dot(graph, limits).pipe(format="svg", neato_no_op=2, encoding="utf-8")
    except graphviz.ExecutableNotFound:
        raise CircuitscopeError(INSTALL_GRAPHVIZ) from None


def save_svg(graph: AttributionGraph, path: str | Path, limits: DrawLimits | None = None) -> Path:
    """Write the drawing to ``path`` (atomically)."""
    write_text_atomic(path, render_svg(graph, limits))
    return Path(path)
