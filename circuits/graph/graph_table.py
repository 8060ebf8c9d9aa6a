"""A graph as columns: its nodes' attributes by id, and its edges as three arrays over the node order.

This is what the compact graph file holds and what a freshly loaded :class:`AttributionGraph` keeps until
something needs ``networkx``: the questions about one node (its attributes, its inputs and outputs) are answered
from the columns in milliseconds, while building a ``networkx.DiGraph`` of a million edges takes seconds and
about a gigabyte.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np


def compact_weights(values: Iterable[float] | np.ndarray) -> np.ndarray:
    """Weights as float32 when that loses nothing (a trace's weights are float32 values), else float64
    (a merged graph's sums): shape (E,)."""
    exact = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    single = exact.astype(np.float32)
    return single if np.array_equal(single.astype(np.float64), exact) else exact


@dataclass(frozen=True)
class EdgeColumns:
    """Edges over a list of node ids: edge i runs from ``ids[sources[i]]`` to ``ids[targets[i]]`` with
    ``weights[i]``. ``sources``, ``targets``: (E,) int32; ``weights``: (E,) float32 or float64."""

    sources: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    @classmethod
    def of(cls, sources: Iterable[int], targets: Iterable[int], weights: Iterable[float] | np.ndarray) -> EdgeColumns:
        return cls(np.asarray(list(sources) if not isinstance(sources, np.ndarray) else sources, dtype=np.int32),
                   np.asarray(list(targets) if not isinstance(targets, np.ndarray) else targets, dtype=np.int32),
                   compact_weights(weights))

    def __len__(self) -> int:
        return len(self.weights)

    def check(self, n_nodes: int) -> None:
        """Raise ValueError unless the columns agree in length and every index names one of ``n_nodes`` nodes."""
        if not len(self.sources) == len(self.targets) == len(self.weights):
            raise ValueError("the edge columns differ in length")
        if self.sources.ndim != 1 or self.targets.ndim != 1 or self.weights.ndim != 1:
            raise ValueError("an edge column is not one-dimensional")
        for column in (self.sources, self.targets):
            if len(column) and (column.min() < 0 or column.max() >= n_nodes):
                raise ValueError("an edge names a node that is not in the file")

    def canonical_bytes(self) -> Iterator[bytes]:
        """The columns as bytes that do not depend on how they are stored: int32 and float64, little-endian."""
        yield self.sources.astype("<i4").tobytes()
        yield self.targets.astype("<i4").tobytes()
        yield self.weights.astype("<f8").tobytes()


@dataclass
class GraphTable:
    """Nodes (id -> attributes, in node order; the attributes of :class:`~circuits.graph.schema.NodeData` without
    ``id``) and the edges among them as :class:`EdgeColumns` over that order."""

    nodes: dict[str, dict]
    edges: EdgeColumns
    _index: dict[str, int] | None = field(default=None, repr=False)
    _ids: np.ndarray | None = field(default=None, repr=False)

    def index(self, node: str) -> int:
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.nodes)}
        return self._index[node]

    def _id_array(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.array(list(self.nodes), dtype=object)
        return self._ids

    def in_edges(self, node: str) -> list[tuple[str, float]]:
        """(source, weight) of the edges into ``node``, in file order."""
        hits = np.flatnonzero(self.edges.targets == self.index(node))
        return list(zip(self._id_array()[self.edges.sources[hits]].tolist(), self.edges.weights[hits].tolist(),
                        strict=True))

    def out_edges(self, node: str) -> list[tuple[str, float]]:
        """(target, weight) of the edges out of ``node``, in file order."""
        hits = np.flatnonzero(self.edges.sources == self.index(node))
        return list(zip(self._id_array()[self.edges.targets[hits]].tolist(), self.edges.weights[hits].tolist(),
                        strict=True))

    def to_networkx(self) -> nx.DiGraph:
        """The ``networkx`` graph, nodes and edges in the columns' order (so a saved graph reloads identically)."""
        graph = nx.DiGraph()
        graph.add_nodes_from(self.nodes.items())
        ids = self._id_array()
        graph.add_weighted_edges_from(zip(ids[self.edges.sources].tolist(), ids[self.edges.targets].tolist(),
                                          self.edges.weights.tolist(), strict=True))
        return graph

    @classmethod
    def from_networkx(cls, graph: nx.DiGraph) -> GraphTable:
        nodes: Mapping[str, dict] = graph.nodes
        index = {n: i for i, n in enumerate(nodes)}
        triples = list(graph.edges(data="weight"))
        return cls(dict(nodes.items()), EdgeColumns.of((index[s] for s, _, _ in triples),
                                                       (index[t] for _, t, _ in triples),
                                                       [w for _, _, w in triples]), index)
