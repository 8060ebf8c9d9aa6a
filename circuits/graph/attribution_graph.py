"""The attribution graph: a ``networkx.DiGraph`` with typed node and edge attributes plus pydantic metadata,
saved to and loaded from the package's own versioned JSON.

Node ids are stable strings; a feature's identity ``feature_key`` = ``"{layer}:{index}"`` does not depend
on its position, so graphs of different prompts can be compared::

    token@{pos}   feature:{layer}:{index}@{pos}   error:{layer}@{pos}   remainder:{layer}@{pos}   logit:{token_id}@{pos}
    supernode:{name}   (made by :mod:`circuits.graph.supernodes`; ``children`` lists the ids it merged)

Every node carries ``kind``, ``layer`` (-1 for tokens, n_layers for logits), ``position``, ``feature``,
``feature_key``, ``token``, ``token_id``, ``activation``, ``influence``, ``label``, ``probability``,
``members`` (remainders: how many features were folded in) and ``value`` (targets: the value that the
incoming edges plus constants add up to). Edge (s -> t) carries ``weight``: the direct effect of s on t.

Stored by :mod:`circuits.graph.graph_files` (compact safetensors, or a JSON export; the schema and its history are
in :mod:`circuits.graph.schema`). A loaded graph keeps its columns (:class:`~circuits.graph.graph_table.GraphTable`)
and builds the ``networkx`` graph on first use of :attr:`AttributionGraph.graph`, so that a question about one node
(:attr:`~AttributionGraph.nodes`, :meth:`~AttributionGraph.in_edges`, :meth:`~AttributionGraph.out_edges`) costs
milliseconds on a graph of a million edges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import networkx as nx

from .graph_files import StoredGraph, json_file, read_graph, stored_from_file, write_graph
from .graph_files import content_hash as _content_hash
from .graph_table import GraphTable
from .schema import (
    GRAPH_FORMAT,
    GRAPH_SCHEMA_VERSION,
    DictionaryInfo,
    EdgeData,
    FeatureContext,
    FeatureInfo,
    GraphFile,
    GraphMetadata,
    NodeData,
    NodeKind,
    PlanEstimate,
    RunSection,
    Scores,
    UnprunedSection,
)

__all__ = [
    "GRAPH_FORMAT", "GRAPH_SCHEMA_VERSION", "AttributionGraph", "DictionaryInfo", "EdgeData", "FeatureContext",
    "FeatureInfo", "GraphFile", "GraphMetadata", "NodeData", "NodeKind", "PlanEstimate", "RunSection", "Scores",
    "UnprunedSection",
]


class AttributionGraph:
    """A graph and its metadata. ``nodes[id]`` (and ``graph.nodes[id]``) holds a :class:`NodeData`'s fields
    without ``id``. Built from a ``networkx.DiGraph``, or from a :class:`GraphTable` (a loaded file), in which case
    :attr:`graph` is built on first use and from then on is the graph's one truth (edit it freely)."""

    def __init__(self, graph: nx.DiGraph | GraphTable, metadata: GraphMetadata,
                 unpruned: UnprunedSection | None = None):
        self._graph: nx.DiGraph | None = None if isinstance(graph, GraphTable) else graph
        self._table: GraphTable | None = graph if isinstance(graph, GraphTable) else None
        self._metadata = metadata
        self._feature_info: Callable[[], dict[str, FeatureInfo]] | None = None  # a loaded file's, until asked for
        self.unpruned = unpruned  # what pruning removed, when kept (see circuits.graph.unpruned)

    @property
    def metadata(self) -> GraphMetadata:
        """The trace's metadata; a loaded compact file's ``feature_info`` is read on first use."""
        if self._feature_info is not None:
            self._metadata.feature_info, self._feature_info = self._feature_info(), None
        return self._metadata

    @metadata.setter
    def metadata(self, metadata: GraphMetadata) -> None:
        self._metadata, self._feature_info = metadata, None

    @property
    def tokens(self) -> list[str]:
        """The prompt's tokens (``metadata.tokens``, without reading the features' contexts)."""
        return self._metadata.tokens

    @property
    def graph(self) -> nx.DiGraph:
        """The ``networkx`` graph (built from the loaded columns the first time it is asked for)."""
        if self._graph is None:
            assert self._table is not None
            self._graph, self._table = self._table.to_networkx(), None
        return self._graph

    @property
    def table(self) -> GraphTable:
        """The graph as columns (a fresh copy of the ``networkx`` graph's, once that exists)."""
        return self._table if self._graph is None else GraphTable.from_networkx(self._graph)

    @property
    def nodes(self) -> Mapping[str, dict]:
        """Node id -> attributes, without building ``networkx``."""
        return self._graph.nodes if self._graph is not None else self._table.nodes

    @property
    def n_edges(self) -> int:
        """The number of edges, without building ``networkx``."""
        return self._graph.number_of_edges() if self._graph is not None else len(self._table.edges)

    def in_edges(self, node: str) -> list[tuple[str, float]]:
        """(source, weight) of the edges into ``node``."""
        if self._graph is not None:
            return [(s, w) for s, _, w in self._graph.in_edges(node, data="weight")]
        return self._table.in_edges(node)

    def out_edges(self, node: str) -> list[tuple[str, float]]:
        """(target, weight) of the edges out of ``node``."""
        if self._graph is not None:
            return [(t, w) for _, t, w in self._graph.out_edges(node, data="weight")]
        return self._table.out_edges(node)

    def nodes_of_kind(self, kind: NodeKind) -> list[str]:
        return [n for n, data in self.nodes.items() if data["kind"] == kind]

    @property
    def logit_nodes(self) -> list[str]:
        return self.nodes_of_kind("logit")

    def _stored(self) -> StoredGraph:
        """The content (timings and plan moved to the run section), the edge columns and the run."""
        table = self.table
        content = GraphFile(metadata=self.metadata.model_copy(update={"timings": {}, "plan": None}),
                            nodes=[NodeData(id=n, **data) for n, data in table.nodes.items()], edges=[],
                            unpruned=self.unpruned)
        return StoredGraph(content, table.edges, RunSection(timings=self.metadata.timings, plan=self.metadata.plan))

    def to_file(self) -> GraphFile:
        """The JSON layout's file: content, edges as a list, the run, and ``content_hash``."""
        return json_file(self._stored())

    def to_json(self) -> str:
        return self.to_file().model_dump_json()

    @property
    def content_hash(self) -> str:
        """sha256 of the graph's content (everything but the run's timings and plan): equal for equal traces."""
        stored = self._stored()
        return _content_hash(stored.content, stored.edges)

    def save(self, path: str | Path) -> Path:
        """Write the graph atomically: the compact layout, or the JSON export when ``path`` ends in ``.json``
        (see :mod:`circuits.graph.graph_files`)."""
        return write_graph(path, self._stored())

    @classmethod
    def from_stored(cls, stored: StoredGraph) -> AttributionGraph:
        content = stored.content
        metadata = content.metadata
        if stored.run is not None:  # schema 4 keeps the run apart; the API shows it in the metadata as before
            metadata = metadata.model_copy(update={"timings": stored.run.timings, "plan": stored.run.plan})
        nodes = {node.id: node.model_dump(exclude={"id"}) for node in content.nodes}
        graph = cls(GraphTable(nodes, stored.edges), metadata, content.unpruned)
        graph._feature_info = stored.feature_info
        return graph

    @classmethod
    def from_file(cls, data: GraphFile) -> AttributionGraph:
        return cls.from_stored(stored_from_file(data))

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        """Read a graph file of either layout; a damaged file or one from a newer schema gets one clear message."""
        return cls.from_stored(read_graph(path))
