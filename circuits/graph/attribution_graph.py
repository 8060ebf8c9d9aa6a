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

Schema history: 1, the pruned graph; 2 (a superset: version 1 files still load) adds ``supernode`` nodes
with ``children`` and the optional ``unpruned`` section (:class:`UnprunedSection`); 3 (a superset of 2)
adds ``metadata.feature_info``: per feature key, what the dictionaries' labels say about the feature
(:class:`FeatureInfo`: its label, activation frequency, top contexts, promoted and suppressed tokens), so
that a graph renders its features' contexts without the dictionaries; 4 (a superset of 3) writes the run's timings
and the plan's estimate of its memory and time (:class:`PlanEstimate`) in a ``run`` section of their own and
records ``content_hash``, the sha256 of the rest, so two runs of the same trace have the same content and hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import networkx as nx
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator

from dictionaries.atomic_output import write_text_atomic
from dictionaries.errors import CircuitscopeError

from ..settings import TraceSettings
from .node_kinds import node_kind

GRAPH_FORMAT = "circuitscope.graph"
GRAPH_SCHEMA_VERSION = 4
NodeKind = Annotated[str, AfterValidator(lambda kind: node_kind(kind).name)]  # a kind of circuits.graph.node_kinds


class NodeData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    kind: NodeKind
    layer: int
    position: int
    feature: int | None = None
    feature_key: str | None = None
    token: str | None = None
    token_id: int | None = None
    activation: float | None = None
    influence: float = 0.0
    label: str | None = None
    probability: float | None = None
    members: int | None = None
    value: float | None = None
    children: list[str] | None = None


class EdgeData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    target: str
    weight: float


class Scores(BaseModel):
    """See :class:`circuits.engine.influence.GraphScores` for the definitions; ``*_unpruned`` on the full graph."""

    replacement: float
    completeness: float
    replacement_unpruned: float
    completeness_unpruned: float


class DictionaryInfo(BaseModel):
    kind: str
    n_layers: int
    d_model: int
    widths: list[int]
    activation: str
    source: str | None = None


class FeatureContext(BaseModel):
    """A top-activating context of a feature: ``tokens`` around its maximum, the feature's ``activations``
    on them, and ``peak``, the index of the maximum in ``tokens``."""

    model_config = ConfigDict(extra="forbid")

    tokens: list[str]
    activations: list[float]
    peak: int


class FeatureInfo(BaseModel):
    """What a dictionary set's labels (:mod:`dictionaries.labels`) say about one feature: ``frequency`` (share
    of corpus tokens where it is active), ``mean_activation`` (when active), ``contexts`` (strongest first)
    and the tokens its decoder ``promoted`` and ``suppressed`` most (strongest first)."""

    model_config = ConfigDict(extra="forbid")

    label: str
    frequency: float
    mean_activation: float
    contexts: list[FeatureContext] = []
    promoted: list[str] = []
    suppressed: list[str] = []


class PlanEstimate(BaseModel):
    """The trace's plan (see :mod:`circuits.engine.plan`): estimated peak memory (bytes) and time of attribution and
    pruning (seconds), and the batch size it chose."""

    model_config = ConfigDict(extra="forbid")

    peak_bytes: int
    adjacency_bytes: int
    seconds: float
    batch_size: int


class GraphMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    target_position: int
    model: str
    n_layers: int
    dictionaries: DictionaryInfo
    settings: TraceSettings
    scores: Scores
    n_active_features: int
    n_expanded_features: int
    timings: dict[str, float] = {}
    plan: PlanEstimate | None = None  # what the trace estimated before computing its rows (schema 4)
    feature_info: dict[str, FeatureInfo] = {}  # feature key "layer:index" -> labels (schema 3)


class UnprunedSection(BaseModel):
    """What pruning removed (kept when ``TraceSettings.keep_unpruned``), so that a file holds the whole graph:
    the nodes pruning dropped, and every edge it dropped (among all nodes) as columns, edge i running from
    ``endpoints[sources[i]]`` to ``endpoints[targets[i]]`` with ``weights[i]``. See :mod:`circuits.graph.unpruned`."""

    model_config = ConfigDict(extra="forbid")

    nodes: list[NodeData] = []
    endpoints: list[str] = []
    sources: list[int] = []
    targets: list[int] = []
    weights: list[float] = []

    @model_validator(mode="after")
    def _columns_agree(self) -> UnprunedSection:
        if not len(self.sources) == len(self.targets) == len(self.weights):
            raise ValueError("sources, targets and weights differ in length")
        if any(not 0 <= i < len(self.endpoints) for i in (*self.sources, *self.targets)):
            raise ValueError("an edge index is outside endpoints")
        return self


class RunSection(BaseModel):
    """What differs between two runs of the same trace (timings, the plan's estimate): written apart from the
    graph's content and left out of its ``content_hash``, so that the same trace gives the same content bytes."""

    model_config = ConfigDict(extra="forbid")

    timings: dict[str, float] = {}
    plan: PlanEstimate | None = None


class GraphFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["circuitscope.graph"] = GRAPH_FORMAT
    schema_version: int = GRAPH_SCHEMA_VERSION
    metadata: GraphMetadata
    nodes: list[NodeData]
    edges: list[EdgeData]
    unpruned: UnprunedSection | None = None
    content_hash: str | None = None  # sha256 of the file without this field and ``run`` (schema 4)
    run: RunSection | None = None  # how this run went: not part of the graph's content (schema 4)

    @model_validator(mode="after")
    def _edges_join_nodes(self) -> GraphFile:
        ids = {node.id for node in self.nodes}
        if len(ids) != len(self.nodes):
            raise ValueError("two nodes share an id")
        missing = next((e for e in self.edges if e.source not in ids or e.target not in ids), None)
        if missing is not None:
            raise ValueError(f"edge {missing.source} -> {missing.target} names a node that is not in the file")
        if self.unpruned is not None:
            ids |= {node.id for node in self.unpruned.nodes}
            if not ids.issuperset(self.unpruned.endpoints):
                raise ValueError("an unpruned edge names a node that is not in the file")
        return self


class AttributionGraph:
    """A graph and its metadata. ``graph.nodes[id]`` holds a :class:`NodeData`'s fields (without ``id``)."""

    def __init__(self, graph: nx.DiGraph, metadata: GraphMetadata, unpruned: UnprunedSection | None = None):
        self.graph = graph
        self.metadata = metadata
        self.unpruned = unpruned  # what pruning removed, when kept (see circuits.graph.unpruned)

    def nodes_of_kind(self, kind: NodeKind) -> list[str]:
        return [n for n, data in self.graph.nodes(data=True) if data["kind"] == kind]

    @property
    def logit_nodes(self) -> list[str]:
        return self.nodes_of_kind("logit")

    def to_file(self) -> GraphFile:
        """The file's content: the run's timings and plan go to ``run``, and ``content_hash`` covers the rest."""
        nodes = [NodeData(id=n, **data) for n, data in self.graph.nodes(data=True)]
        edges = [EdgeData(source=s, target=t, weight=d["weight"]) for s, t, d in self.graph.edges(data=True)]
        content = self.metadata.model_copy(update={"timings": {}, "plan": None})
        data = GraphFile(metadata=content, nodes=nodes, edges=edges, unpruned=self.unpruned)
        digest = hashlib.sha256(data.model_dump_json().encode()).hexdigest()
        return data.model_copy(update={"content_hash": digest,
                                       "run": RunSection(timings=self.metadata.timings, plan=self.metadata.plan)})

    def to_json(self) -> str:
        return self.to_file().model_dump_json()

    @property
    def content_hash(self) -> str:
        """sha256 of the graph's content (everything but the run's timings and plan): equal for equal traces."""
        return self.to_file().content_hash or ""

    def save(self, path: str | Path) -> Path:
        """Write the graph as JSON (atomically)."""
        write_text_atomic(path, self.to_json())
        return Path(path)

    @classmethod
    def from_file(cls, data: GraphFile) -> AttributionGraph:
        if data.run is not None:  # schema 4 keeps the run apart; the API shows it in the metadata as before
            data = data.model_copy(update={"metadata": data.metadata.model_copy(
                update={"timings": data.run.timings, "plan": data.run.plan})})
        graph = nx.DiGraph()
        for node in data.nodes:
            fields = node.model_dump()
            graph.add_node(fields.pop("id"), **fields)
        for edge in data.edges:
            graph.add_edge(edge.source, edge.target, weight=edge.weight)
        return cls(graph, data.metadata, data.unpruned)

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        """Read a graph JSON file; a damaged file or one from a newer schema gets one clear message."""
        path = Path(path)
        try:
            raw: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CircuitscopeError(f"{path}: no such graph file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CircuitscopeError(f"{path}: not a graph JSON file ({exc}); trace the prompt again") from None
        except OSError as exc:  # a directory, no permission, ...
            raise CircuitscopeError(f"{path}: cannot read it ({exc.strerror}); name a graph JSON file") from None
        if not isinstance(raw, dict) or raw.get("format") != GRAPH_FORMAT:
            raise CircuitscopeError(f"{path}: not a circuitscope graph file; trace the prompt again")
        version = raw.get("schema_version")
        if type(version) is not int:
            raise CircuitscopeError(f"{path}: damaged graph file (schema_version {version!r} is not a whole number); "
                                    "trace the prompt again")
        if version > GRAPH_SCHEMA_VERSION:
            raise CircuitscopeError(
                f"{path}: written by a newer circuitscope (graph schema {version}; this one reads up to "
                f"{GRAPH_SCHEMA_VERSION}); upgrade circuitscope"
            )
        try:
            data = GraphFile.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "file"
            raise CircuitscopeError(
                f"{path}: damaged graph file ({where}: {first['msg']}); trace the prompt again"
            ) from None
        return cls.from_file(data)
