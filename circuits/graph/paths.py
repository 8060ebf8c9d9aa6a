"""The strongest paths from token nodes to a target node, optionally constrained to paths that explain.

A path's strength is the product of the normalised weights of its edges (see :mod:`circuits.graph.weights`):
the fraction of the target's input that arrives along that path, when every node passes on its input in
proportion to its absolute incoming weights. Its sign is the product of the edges' signs. The graph is
layered, so one sweep in topological order keeps the k best partial paths into every node and finds the
exact top k (no enumeration of all paths).

A :class:`PathFilter` keeps only paths that explain something:

- ``min_feature_hops``: at least N of the nodes strictly between source and target are features (or
  supernodes). The sweep's state becomes (node, min(hops so far, N)), so the top k stay exact.
- ``direct=False``: no one-edge path (a source straight into the target, e.g. token -> logit).
- ``exclude_kinds``: no intermediate node of these kinds (e.g. ``error``, ``remainder``).
- ``layers``: every intermediate node's layer within ``(low, high)``, both included.

Constraints filter nodes and edges; they never renormalise: a path's strength is still its share of the
target's whole input, so filtered and unfiltered strengths compare directly.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx

from dictionaries.errors import CircuitscopeError

from .attribution_graph import AttributionGraph
from .lookup import require_node, top_logit
from .node_kinds import node_kind
from .weights import normalised_weights

FEATURE_HOP_KINDS = frozenset({"feature", "supernode"})  # the kinds that count towards ``min_feature_hops``


@dataclass(frozen=True)
class GraphPath:
    """One path: ``nodes[0]`` (a source) to ``nodes[-1]`` (the target), with every edge's raw weight."""

    nodes: list[str]
    weights: list[float]
    strength: float  # product of the normalised edge weights, in [0, 1]
    sign: int  # +1 or -1: the product of the edges' signs


@dataclass(frozen=True)
class PathFilter:
    """Which paths count (see the module docstring). The default keeps every path."""

    min_feature_hops: int = 0
    direct: bool = True
    exclude_kinds: frozenset[str] = field(default_factory=frozenset)
    layers: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.min_feature_hops < 0:
            raise CircuitscopeError(f"min feature hops must be >= 0, got {self.min_feature_hops}")
        for kind in self.exclude_kinds:
            try:
                node_kind(kind)
            except ValueError as error:
                raise CircuitscopeError(str(error)) from None
        if self.layers is not None and self.layers[0] > self.layers[1]:
            raise CircuitscopeError(f"layer range {self.layers[0]}-{self.layers[1]} is empty (low > high)")

    def allows_between(self, data: dict) -> bool:
        """Whether a node with attributes ``data`` may stand between a path's source and its target."""
        if data["kind"] in self.exclude_kinds:
            return False
        return self.layers is None or self.layers[0] <= data["layer"] <= self.layers[1]


ALL_PATHS = PathFilter()


def parse_layer_range(text: str) -> tuple[int, int]:
    """``"3-9"`` -> (3, 9); ``"5"`` -> (5, 5). CircuitscopeError for anything else."""
    low, sep, high = text.partition("-")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise CircuitscopeError(f"layer range {text!r}: write LOW-HIGH (e.g. 3-9) or one layer") from None
    if bounds[0] > bounds[1]:
        raise CircuitscopeError(f"layer range {text!r} is empty (low > high)")
    return bounds


def strongest_paths(graph: AttributionGraph, target: str | None = None, k: int = 5,
                    sources: Iterable[str] | None = None, only: PathFilter = ALL_PATHS) -> list[GraphPath]:
    """The ``k`` strongest paths from any of ``sources`` (default: the token nodes) to ``target``
    (default: the most likely logit) that ``only`` allows, strongest first."""
    if k < 1:
        raise CircuitscopeError(f"k must be at least 1, got {k}")
    target = target or top_logit(graph)
    require_node(graph, target)
    starts = set(graph.nodes_of_kind("token") if sources is None else sources)
    for node in starts:
        require_node(graph, node)
    nodes = graph.graph.nodes
    allowed_between = {v for v in graph.nodes if only.allows_between(nodes[v])}
    sub = graph.graph.subgraph(allowed_between | starts | {target})
    relevant = nx.ancestors(sub, target) | {target}
    sub = sub.subgraph(relevant)
    try:
        order = list(nx.topological_sort(sub))
    except nx.NetworkXUnfeasible:
        raise CircuitscopeError("the graph has a cycle (a supernode spans layers that feed each other); "
                                "path queries need an acyclic graph: merge nodes of one layer only") from None
    share = normalised_weights(graph)
    need = only.min_feature_hops
    # best[v, h]: up to k entries (strength, sign, node, parent entry) of the paths of one edge or more into v
    # whose nodes before v hold min(need, feature hops) == h; an entry is a linked list back to its source.
    best: dict[tuple[str, int], list[tuple]] = {}
    for v in order:
        candidates: dict[int, list[tuple]] = {}
        for u in sub.predecessors(v):
            w = sub.edges[u, v]["weight"]
            step, sign = share[u, v], (1 if w >= 0 else -1)
            if u in starts and (only.direct or v != target):  # the path starts at u
                candidates.setdefault(0, []).append((step, sign, v, (1.0, 1, u, None)))
            if u not in allowed_between:
                continue
            hop = 1 if nodes[u]["kind"] in FEATURE_HOP_KINDS else 0
            for h in range(need + 1):
                extended = [(e[0] * step, e[1] * sign, v, e) for e in best.get((u, h), ())]
                if extended:
                    candidates.setdefault(min(need, h + hop), []).extend(extended)
        for h, entries in candidates.items():
            best[v, h] = heapq.nlargest(k, entries, key=lambda e: e[0])
    return [_unwind(graph, entry) for entry in best.get((target, need), [])]


def _unwind(graph: AttributionGraph, entry: tuple) -> GraphPath:
    strength, sign, _, _ = entry
    nodes = []
    while entry is not None:
        nodes.append(entry[2])
        entry = entry[3]
    nodes.reverse()
    weights = [graph.graph.edges[u, v]["weight"] for u, v in itertools.pairwise(nodes)]
    return GraphPath(nodes=nodes, weights=weights, strength=strength, sign=sign)
