"""A self-contained interactive HTML page for one graph: no network access, everything inline.

The page embeds the graph (every node, and the ``max_edges`` most important edges; 200,000 by default,
enough for the graphs pruning leaves) as JSON and draws it in the browser with the SVG's layout and labels
(:mod:`viz.selection`, :func:`viz.labels.drawn_lines`): a threshold slider picks nodes by cumulative influence (as
pruning does; errors are small marks where they are as influential as the weakest node drawn), a second slider sets
how many of the most important edges among them are drawn, the first view fits the whole drawing, clicking a node
lists its inputs and outputs (and, for a
feature whose graph carries labels, its top-activating contexts and the tokens it promotes and suppresses),
hovering shows details. See :mod:`viz.page_script` for the script and how the page reports errors.

With an attention section (:class:`circuits.attention.summary.AttentionSummary`, from ``circuitscope query GRAPH
attention --html``) the page also embeds the annotated edges' head routes and QK attributions, and a selected node's
input rows with head data open a panel of the edge's heads (:mod:`viz.page_heads`). Without it the page has neither.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.node_kinds import node_kind, node_kind_names
from circuits.graph.subgraphs import cumulative_influence
from circuits.graph.weights import edge_importance
from dictionaries.atomic_output import write_text_atomic

from .labels import drawn_lines, node_description, node_label
from .page_heads import HEADS_CSS, HEADS_JS
from .page_script import ERROR_TRAP, PAGE_JS
from .page_style import PAGE_CSS
from .palette import NEGATIVE, POSITIVE
from .selection import DrawLimits, Grid, ranked_nodes

if TYPE_CHECKING:  # the summary's module imports torch; the page only dumps it
    from circuits.attention.summary import AttentionSummary


class PageOptions(BaseModel):
    """``max_edges``: edges embedded in the page (most important first); ``threshold``: the initial
    cumulative-influence threshold (None: the one that shows as many nodes as the SVG, ``DrawLimits().max_nodes``);
    ``edges_shown``: how many edges are drawn at first."""

    max_edges: int = Field(default=200_000, ge=0)
    threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    edges_shown: int = Field(default=300, ge=0)


def _short(x: float) -> float:
    return float(f"{x:.6g}")


def page_data(graph: AttributionGraph, options: PageOptions, attention: AttentionSummary | None = None) -> dict:
    """What the page's script reads: metadata, the layout's grid, nodes (with their label, the lines drawn and
    cumulative influence; ``cum`` is null for nodes that do not compete for a place) and edges
    ``[source index, target index, weight]``, most important first; with ``attention``, its JSON as
    ``attention``."""
    meta = graph.metadata
    ranked = ranked_nodes(graph)
    shares = cumulative_influence(graph, ranked)
    threshold = options.threshold
    if threshold is None:
        threshold = shares[ranked[min(DrawLimits().max_nodes, len(ranked)) - 1]] if ranked else 1.0
    order = {node: i for i, node in enumerate(graph.graph.nodes)}
    grid = Grid()
    nodes = []
    for node, data in graph.nodes.items():
        line1, line2 = node_label(graph, node)
        nodes.append({"id": node, "kind": data["kind"], "layer": data["layer"], "pos": data["position"],
                      "l1": line1, "l2": line2, "lines": drawn_lines(graph, node, grid.label_width, grid.label_lines),
                      "desc": node_description(graph, node),
                      "infl": _short(data["influence"]), "cum": shares.get(node), "fk": data.get("feature_key")})
    importance = edge_importance(graph)
    ranked = sorted(importance, key=lambda e: -importance[e])[: options.max_edges]
    edges = [[order[s], order[t], _short(graph.graph.edges[s, t]["weight"])] for s, t in ranked]
    summary = (f"{meta.model} · {meta.dictionaries.kind} · replacement {meta.scores.replacement:.3f}, "
               f"completeness {meta.scores.completeness:.3f} · {graph.graph.number_of_nodes()} nodes, "
               f"{graph.graph.number_of_edges()} edges")
    data = {
        "meta": {"prompt": meta.prompt, "summary": summary, "n_layers": meta.n_layers,
                 "n_edges": graph.graph.number_of_edges()},
        "view": {"threshold": threshold, "edges": options.edges_shown},
        "grid": asdict(grid.with_room_for(grid.label_lines + 1)),
        "kinds": {name: {"shape": node_kind(name).shape, "fill": node_kind(name).fill, "mark": node_kind(name).mark}
                  for name in node_kind_names()},
        "colours": {"positive": POSITIVE, "negative": NEGATIVE},
        "nodes": nodes,
        "edges": edges,
        "features": _feature_info(graph),
    }
    if attention is not None:
        data["attention"] = attention.model_dump(mode="json")
    return data


def _feature_info(graph: AttributionGraph) -> dict:
    """Feature key -> its labels' record (top contexts, frequency, promoted and suppressed tokens), for the
    features that are nodes of the page; what the details panel shows when such a node is clicked."""
    info = graph.metadata.feature_info
    keys = {key for key in dict(graph.graph.nodes(data="feature_key")).values() if key in info}
    return {key: info[key].model_dump() for key in sorted(keys)}


def _inline_json(value: dict) -> str:
    """JSON that cannot end its <script> element early."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def render_html(graph: AttributionGraph, options: PageOptions | None = None,
                attention: AttentionSummary | None = None) -> str:
    """The page as one HTML string (with ``attention``: its section, and the heads panel's style and script)."""
    options = options or PageOptions()
    style, heads_script = PAGE_CSS, ""
    if attention is not None:
        style, heads_script = PAGE_CSS + HEADS_CSS, f"<script>{HEADS_JS}</script>\n"
    title = html.escape(f"circuitscope: {graph.metadata.prompt}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<style>{style}</style></head>
<body data-state="loading">
<script>{ERROR_TRAP}</script>
<div id="canvas"><svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg></div>
<div id="panel">
<h1 id="title"></h1><div id="meta" class="meta"></div><div id="counts" class="meta"></div>
<div class="control">
<label for="threshold">node threshold (cumulative influence)<span id="threshold-value"></span></label>
<input id="threshold" type="range" min="0.01" max="1" step="0.01"></div>
<div class="control"><label for="edges">edges drawn (most important first)<span id="edges-value"></span></label>
<input id="edges" type="range" min="0" step="10"></div>
<div class="control"><button id="zoom-out">−</button><button id="zoom-in">+</button><button id="zoom-fit">fit</button>
<span class="hint">blue: positive, red: negative; width: |weight|</span></div>
<div id="details"></div><pre id="errors"></pre></div>
<div id="tooltip"></div>
<script id="graph-data" type="application/json">{_inline_json(page_data(graph, options, attention))}</script>
{heads_script}<script>{PAGE_JS}</script>
</body></html>
"""


def save_html(graph: AttributionGraph, path: str | Path, options: PageOptions | None = None,
              attention: AttentionSummary | None = None) -> Path:
    """Write the page to ``path`` (atomically)."""
    write_text_atomic(path, render_html(graph, options, attention))
    return Path(path)
