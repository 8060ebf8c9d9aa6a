"""Which nodes and edges a drawing shows, and where each node goes.

Graphs from real models hold a thousand nodes and 10^5 edges; a drawing shows the ``max_nodes`` most
influential nodes (tokens and logits always) and, among them, the ``max_edges`` most important edges
(normalised weight times the target's influence, see :mod:`circuits.graph.weights`).

Layout: layers bottom to top (tokens at the bottom, logits on top), token positions left to right. The
nodes of one (layer, position) cell sit side by side, most influential first, wrapping after
``per_row`` nodes; a column is as wide as its widest cell, a layer band as tall as its tallest cell.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from pydantic import BaseModel, Field

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.node_kinds import node_kind
from circuits.graph.weights import edge_importance


class DrawLimits(BaseModel):
    """How much of a graph one drawing shows."""

    max_nodes: int = Field(default=120, ge=1)  # besides tokens and logits, by influence
    max_edges: int = Field(default=400, ge=0)  # among the drawn nodes, by importance


@dataclass(frozen=True)
class Selection:
    nodes: list[str]
    edges: list[tuple[str, str]]  # most important first
    hidden_nodes: int
    hidden_edges: int


def ranked_nodes(graph: AttributionGraph) -> list[str]:
    """Nodes that compete for space (everything but tokens and logits), most influential first."""
    nodes = [n for n, kind in graph.graph.nodes(data="kind") if not node_kind(kind).always_drawn]
    return sorted(nodes, key=lambda v: -graph.graph.nodes[v]["influence"])


def ranked_edges(graph: AttributionGraph) -> list[tuple[str, str]]:
    """Every edge, most important first."""
    importance = edge_importance(graph)
    return sorted(importance, key=lambda e: -importance[e])


def select(graph: AttributionGraph, limits: DrawLimits) -> Selection:
    ranked = ranked_nodes(graph)
    always = {n for n, kind in graph.graph.nodes(data="kind") if node_kind(kind).always_drawn}
    shown = always | set(ranked[: limits.max_nodes])
    edges = [e for e in ranked_edges(graph) if e[0] in shown and e[1] in shown]
    nodes = [n for n in graph.graph.nodes if n in shown]
    return Selection(nodes, edges[: limits.max_edges], graph.graph.number_of_nodes() - len(nodes),
                     graph.graph.number_of_edges() - min(len(edges), limits.max_edges))


@dataclass(frozen=True)
class Grid:
    """Slot sizes of a layout, in drawing units."""

    slot_width: float = 80.0
    slot_height: float = 46.0
    per_row: int = 4
    band_gap: float = 26.0
    column_gap: float = 24.0


@dataclass(frozen=True)
class Placement:
    """Centre (x, y) of every node and the centre y of every layer's band; y grows downwards (the top
    layer has the smallest y), x from 0 at the first position."""

    where: dict[str, tuple[float, float]]
    band_centre: dict[int, float]
    height: float


def layout(graph: AttributionGraph, nodes: list[str], grid: Grid = Grid()) -> Placement:
    """Where every node of ``nodes`` goes (see the module docstring)."""
    cells: dict[tuple[int, int], list[str]] = defaultdict(list)
    for node in nodes:
        data = graph.graph.nodes[node]
        cells[data["layer"], data["position"]].append(node)
    for members in cells.values():
        members.sort(key=lambda v: -graph.graph.nodes[v]["influence"])
    layers = sorted({layer for layer, _ in cells})
    positions = sorted({pos for _, pos in cells})
    widest = {p: max(min(len(m), grid.per_row) for (_, q), m in cells.items() if q == p) for p in positions}
    tallest = {k: max(math.ceil(len(m) / grid.per_row) for (j, _), m in cells.items() if j == k) for k in layers}
    column_left, x = {}, 0.0
    for p in positions:
        column_left[p] = x
        x += widest[p] * grid.slot_width + grid.column_gap
    band_top, y = {}, 0.0
    for layer in reversed(layers):
        band_top[layer] = y
        y += tallest[layer] * grid.slot_height + grid.band_gap
    where = {}
    for (layer, pos), members in cells.items():
        for i, node in enumerate(members):
            row, col = divmod(i, grid.per_row)
            offset = (widest[pos] - min(len(members) - row * grid.per_row, grid.per_row)) * grid.slot_width / 2
            where[node] = (column_left[pos] + offset + (col + 0.5) * grid.slot_width,
                           band_top[layer] + (row + 0.5) * grid.slot_height)
    centres = {layer: band_top[layer] + tallest[layer] * grid.slot_height / 2 for layer in layers}
    return Placement(where, centres, max(y - grid.band_gap, 0.0))
