"""The graph file's schema: pydantic models of a graph's nodes, edges, metadata and sections, shared by both
layouts of the file (see :mod:`circuits.graph.graph_files`).

Schema history: 1, the pruned graph; 2 (a superset: version 1 files still load) adds ``supernode`` nodes
with ``children`` and the optional ``unpruned`` section (:class:`UnprunedSection`); 3 (a superset of 2)
adds ``metadata.feature_info``: per feature key, what the dictionaries' labels say about the feature
(:class:`FeatureInfo`: its label, activation frequency, top contexts, promoted and suppressed tokens), so
that a graph renders its features' contexts without the dictionaries; 4 (a superset of 3) writes the run's timings
and the plan's estimate of its memory and time (:class:`PlanEstimate`) in a ``run`` section of their own and
records ``content_hash``, the sha256 of the rest, so two runs of the same trace have the same content and hash;
5 adds the compact layout (safetensors edge arrays beside this JSON) and defines ``content_hash`` on the
content's canonical bytes, the same for both layouts (:func:`circuits.graph.graph_files.content_hash`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

from ..settings import TraceSettings
from .node_kinds import node_kind

GRAPH_FORMAT = "circuitscope.graph"
GRAPH_SCHEMA_VERSION = 5
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
    pruning (seconds), the batch size it chose, and with rows stored in bfloat16 the most the float32 recompute of
    the kept rows may take (seconds)."""

    model_config = ConfigDict(extra="forbid")

    peak_bytes: int
    adjacency_bytes: int
    seconds: float
    batch_size: int
    recompute_seconds: float = 0.0


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
    """A graph file's content. The JSON layout holds all of it; the compact layout (schema 5) holds this with
    ``edges`` empty and the unpruned section's columns empty, the edges living in arrays beside it (see
    :mod:`circuits.graph.graph_files`)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["circuitscope.graph"] = GRAPH_FORMAT
    schema_version: int = GRAPH_SCHEMA_VERSION
    metadata: GraphMetadata
    nodes: list[NodeData]
    edges: list[EdgeData]
    unpruned: UnprunedSection | None = None
    content_hash: str | None = None  # see circuits.graph.graph_files.content_hash (schema 4; 5 redefines it)
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
