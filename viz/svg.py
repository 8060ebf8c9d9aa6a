"""SVG through graphviz: layers bottom to top, token positions left to right.

Nodes are placed by :func:`viz.selection.layout` and handed to graphviz's ``neato -n2`` (which keeps the
given positions and only routes the edges), with the shape and fill of their kind (from
:mod:`circuits.graph.node_kinds`: tokens and logits boxes, features ellipses, errors diamonds, ...). A node's
label shows its token text and the feature's label (or layer and index); hovering shows the full description.
Edges are blue when positive and red when negative, their width grows with the absolute weight. Big graphs are cut to
``DrawLimits`` (by default the 120 most influential nodes besides tokens and logits, and the 400 most
important edges among them); the caption says how much is hidden.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import graphviz

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.node_kinds import node_kind
from dictionaries.atomic_output import write_text_atomic
from dictionaries.errors import CircuitscopeError

from .labels import node_description, node_label
from .palette import NEGATIVE, POSITIVE
from .selection import DrawLimits, Grid, layout, select

INSTALL_GRAPHVIZ = ("the graphviz program `neato` is not installed; install graphviz "
                    "(Debian/Ubuntu: apt-get install graphviz, macOS: brew install graphviz, "
                    "conda: conda install -c conda-forge graphviz)")


def _escape(text: str) -> str:
    """Text for a graphviz label: backslashes are escape characters there."""
    return text.replace("\\", "\\\\")


def to_dot(graph: AttributionGraph, limits: DrawLimits | None = None, grid: Grid | None = None) -> graphviz.Digraph:
    """The graphviz description of the drawing (positions fixed; render with ``neato -n2``)."""
    grid = grid or Grid()
    chosen = select(graph, limits or DrawLimits())
    placement = layout(graph, chosen.nodes, grid)
    height = placement.height
    meta = graph.metadata
    caption = (f"{meta.prompt!r} | {meta.model} | replacement {meta.scores.replacement:.3f}, completeness "
               f"{meta.scores.completeness:.3f} | {len(chosen.nodes)} nodes, {len(chosen.edges)} edges shown "
               f"({chosen.hidden_nodes} nodes, {chosen.hidden_edges} edges hidden)")
    dot = graphviz.Digraph(engine="neato")
    dot.attr(label=_escape(caption), labelloc="t", fontsize="11", fontname="Helvetica", splines="curved",
             outputorder="edgesfirst", bgcolor="white", pad="0.3")
    dot.attr("node", style="filled", fontname="Helvetica", fontsize="8", fixedsize="shape",
             width=f"{(grid.slot_width - 8) / 72:.3f}", height=f"{(grid.slot_height - 10) / 72:.3f}",
             color="#4a5568", penwidth="0.8")
    for layer, y in placement.band_centre.items():  # the layer axis, left of the first position
        name = {-1: "tokens", meta.n_layers: "logits"}.get(layer, f"L{layer}")
        dot.node(f"axis{layer}", label=name, shape="plaintext", style="solid", fontsize="10", fontcolor="#718096",
                 pos=f"{-grid.column_gap - 10:.1f},{height - y:.1f}!", **{"class": "axis"})
    names = {node: f"n{i}" for i, node in enumerate(chosen.nodes)}
    for node in chosen.nodes:
        data = graph.graph.nodes[node]
        kind = node_kind(data["kind"])
        x, y = placement.where[node]
        line1, line2 = node_label(graph, node)
        dot.node(names[node], label=f"{_escape(line1)}\\n{_escape(line2)}", shape=kind.shape,
                 fillcolor=kind.fill, pos=f"{x:.1f},{height - y:.1f}!",
                 tooltip=_escape(node_description(graph, node)), **{"class": data["kind"]})
    biggest = max((abs(graph.graph.edges[e]["weight"]) for e in chosen.edges), default=1.0) or 1.0
    for s, t in reversed(chosen.edges):  # the most important edges drawn last, on top
        w = graph.graph.edges[s, t]["weight"]
        dot.edge(names[s], names[t], color=POSITIVE if w >= 0 else NEGATIVE,
                 penwidth=f"{0.3 + 3.7 * abs(w) / biggest:.2f}", arrowsize="0.4",
                 tooltip=_escape(f"{s} → {t}: {w:+.4g}"))
    return dot


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
