"""Which nodes and edges a drawing shows, and where each node goes.

Graphs from real models hold a thousand nodes and 10^5 edges; a drawing shows (``DrawLimits``):

- nodes: tokens and logits always, and the ``max_nodes`` most influential ranked nodes (features, remainders,
  supernodes);
- marks: nodes of a kind drawn as marks (errors, see :mod:`circuits.graph.node_kinds`) do not take a node's place:
  each (layer, position) whose marks together are at least as influential as ``mark_influence`` (by default: as the
  weakest node drawn) gets one small mark; weaker ones are hidden;
- edges, among what is drawn: each node keeps its ``edges_per_node`` strongest inputs by normalised weight (the
  edge's share of everything that flows into the node, :mod:`circuits.graph.weights`), those that carry at least
  ``min_edge_share`` of it; of these the ``max_edges`` most important (normalised weight times the target's
  influence) are drawn. A logit reads its few main inputs instead of a fan of hundreds.

Layout: layers bottom to top (tokens at the bottom, logits on top), token positions left to right. The
nodes of one (layer, position) cell sit side by side, most influential first, wrapping after
``per_row`` nodes; a column is as wide as its widest cell, a layer band as tall as its tallest cell. A cell's mark
sits in the gutter left of its column, at the height of its layer's band.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

from pydantic import BaseModel, Field

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.node_kinds import node_kind
from circuits.graph.weights import edge_importance, normalised_weights

Cell = tuple[int, int]  # (layer, position)


class DrawLimits(BaseModel):
    """How much of a graph one drawing shows (see the module docstring)."""

    max_nodes: int = Field(default=80, ge=1)  # ranked nodes besides tokens, logits and marks, by influence
    edges_per_node: int = Field(default=3, ge=0)  # each node's strongest inputs, by normalised weight
    min_edge_share: float = Field(default=0.02, ge=0.0, le=1.0)  # of the target's total absolute input
    max_edges: int = Field(default=150, ge=0)  # of those, by importance
    mark_influence: float | None = Field(default=None, ge=0.0)  # None: the weakest drawn node's influence


@dataclass(frozen=True)
class Selection:
    nodes: list[str]  # drawn full size
    marks: dict[Cell, list[str]]  # one mark per cell: the mark-kind nodes it stands for
    edges: list[tuple[str, str]]  # most important first; their ends are in ``nodes`` or in a mark
    hidden_nodes: int
    hidden_edges: int

    def drawn_as(self) -> dict[str, str | Cell]:
        """Every drawn graph node -> itself, or the cell of the mark it is drawn in."""
        return {**{n: n for n in self.nodes}, **{m: cell for cell, members in self.marks.items() for m in members}}


def _is_mark(kind: str) -> bool:
    return node_kind(kind).mark


def ranked_nodes(graph: AttributionGraph) -> list[str]:
    """Nodes that compete for a place (everything but tokens, logits and marks), most influential first."""
    nodes = [n for n, kind in graph.graph.nodes(data="kind") if not (node_kind(kind).always_drawn or _is_mark(kind))]
    return sorted(nodes, key=lambda v: -graph.nodes[v]["influence"])


def ranked_edges(graph: AttributionGraph) -> list[tuple[str, str]]:
    """Every edge, most important first."""
    importance = edge_importance(graph)
    return sorted(importance, key=lambda e: -importance[e])


def mark_cells(graph: AttributionGraph, floor: float) -> dict[Cell, list[str]]:
    """(layer, position) -> its mark-kind nodes, for the cells whose marks' summed influence is at least ``floor``."""
    cells: dict[Cell, list[str]] = defaultdict(list)
    for node, data in graph.nodes.items():
        if _is_mark(data["kind"]):
            cells[data["layer"], data["position"]].append(node)
    nodes = graph.graph.nodes
    return {cell: members for cell, members in sorted(cells.items())
            if sum(nodes[m]["influence"] for m in members) >= floor}


def strongest_inputs(graph: AttributionGraph, drawn: set[str], per_node: int,
                     min_share: float) -> list[tuple[str, str]]:
    """For every node of ``drawn``: its ``per_node`` inputs from ``drawn`` with the largest normalised weight, those
    of at least ``min_share``."""
    shares = normalised_weights(graph)
    inputs: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for (s, t), share in shares.items():
        if s in drawn and t in drawn and share >= min_share and share > 0:
            inputs[t].append((share, s))
    kept = []
    for t, sources in inputs.items():
        kept += [(s, t) for _, s in sorted(sources, key=lambda pair: -pair[0])[:per_node]]
    return kept


def select(graph: AttributionGraph, limits: DrawLimits) -> Selection:
    ranked = ranked_nodes(graph)[: limits.max_nodes]
    always = {n for n, kind in graph.graph.nodes(data="kind") if node_kind(kind).always_drawn}
    shown = always | set(ranked)
    floor = limits.mark_influence
    if floor is None:
        floor = graph.nodes[ranked[-1]]["influence"] if ranked else math.inf
    marks = mark_cells(graph, floor)
    drawn = shown | {m for members in marks.values() for m in members}
    importance = edge_importance(graph)
    candidates = strongest_inputs(graph, drawn, limits.edges_per_node, limits.min_edge_share)
    edges = sorted(candidates, key=lambda e: -importance[e])[: limits.max_edges]
    nodes = [n for n in graph.graph.nodes if n in shown]
    n_marked = sum(len(members) for members in marks.values())
    return Selection(nodes, marks, edges, graph.graph.number_of_nodes() - len(nodes) - n_marked,
                     graph.graph.number_of_edges() - len(edges))


@dataclass(frozen=True)
class Grid:
    """Slot sizes of a layout, in drawing units (points)."""

    slot_width: float = 96.0
    slot_height: float = 52.0  # room for label_lines lines of the label and one for the token
    per_row: int = 4
    band_gap: float = 26.0
    column_gap: float = 24.0
    gutter: float = 16.0  # left of each column, for the marks
    mark_band: float = 18.0  # the height of a layer band that holds only marks
    label_width: int = 20  # characters per line of a node's label (see viz.wrapping)
    label_lines: int = 3
    line_height: float = 9.5  # of the labels' text (8 points)

    def with_room_for(self, lines: int) -> Grid:
        """This grid with slots tall enough for ``lines`` lines of text in a node."""
        return replace(self, slot_height=max(self.slot_height, 14 + self.line_height * lines))


@dataclass(frozen=True)
class Placement:
    """Centre (x, y) of every node and mark and the centre y of every layer's band; y grows downwards (the top
    layer has the smallest y), x from 0 at the left of the first column."""

    where: dict[str, tuple[float, float]]
    marks: dict[Cell, tuple[float, float]]
    band_centre: dict[int, float]
    width: float
    height: float


def layout(graph: AttributionGraph, nodes: list[str], grid: Grid = Grid(), marks: list[Cell] = ()) -> Placement:
    """Where every node of ``nodes`` and the mark of every cell of ``marks`` go (see the module docstring)."""
    cells: dict[Cell, list[str]] = defaultdict(list)
    for node in nodes:
        data = graph.nodes[node]
        cells[data["layer"], data["position"]].append(node)
    for members in cells.values():
        members.sort(key=lambda v: -graph.nodes[v]["influence"])
    layers = sorted({layer for layer, _ in cells} | {layer for layer, _ in marks})
    positions = sorted({pos for _, pos in cells} | {pos for _, pos in marks})
    widest = dict.fromkeys(positions, 0)
    tallest = dict.fromkeys(layers, 0)
    for (layer, pos), members in cells.items():
        widest[pos] = max(widest[pos], min(len(members), grid.per_row))
        tallest[layer] = max(tallest[layer], math.ceil(len(members) / grid.per_row))
    column_left, x = {}, 0.0
    for p in positions:
        column_left[p] = x + grid.gutter
        x += grid.gutter + widest[p] * grid.slot_width + grid.column_gap
    band_top, band_height, y = {}, {}, 0.0
    for layer in reversed(layers):
        band_top[layer] = y
        band_height[layer] = tallest[layer] * grid.slot_height or grid.mark_band
        y += band_height[layer] + grid.band_gap
    where = {}
    for (layer, pos), members in cells.items():
        for i, node in enumerate(members):
            row, col = divmod(i, grid.per_row)
            offset = (widest[pos] - min(len(members) - row * grid.per_row, grid.per_row)) * grid.slot_width / 2
            where[node] = (column_left[pos] + offset + (col + 0.5) * grid.slot_width,
                           band_top[layer] + (row + 0.5) * grid.slot_height)
    centres = {layer: band_top[layer] + band_height[layer] / 2 for layer in layers}
    placed_marks = {(layer, pos): (column_left[pos] - grid.gutter / 2, centres[layer]) for layer, pos in marks}
    return Placement(where, placed_marks, centres, max(x - grid.column_gap, 0.0), max(y - grid.band_gap, 0.0))
