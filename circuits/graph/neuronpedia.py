"""Export to the JSON read by the public attribution-graph frontend that Neuronpedia uses (the format
circuit-tracer's ``create_graph_files`` writes): top level ``metadata``, ``qParams``, ``nodes``, ``links``.

Node ids (``node_id``, which links name, and ``jsNodeId``, which the frontend keys its nodes by) are
unique; ``feature_type`` says what each node is (L: the model's number of layers)::

    kind       feature_type               node_id                 jsNodeId              feature
    token      embedding                  E_{token_id}_{pos}      E_{token_id}-{pos}    pos
    feature    cross layer transcoder     {layer}_{index}_{pos}   {layer}_{index}-{pos} index
    error      mlp reconstruction error   {layer}_-1_{pos}        {layer}_-1-{pos}      -1
    remainder  unexplored node            {layer}_{n}_{pos}       {layer}_{n}-{pos}     n <= -2
    supernode  supernode                  {layer}_{n}_{pos}       {layer}_{n}-{pos}     n <= -2
    logit      logit                      {L+1}_{token_id}_{pos}  L_{token_id}-{pos}    token id

``cross layer transcoder`` is the frontend's one type for a dictionary feature (per-layer and skip
transcoders included). A remainder (features of one (layer, position) that were not expanded, summed) is
the frontend's ``unexplored node``. Nodes that are not features get negative ``feature`` numbers, one each
(errors -1), never a real index, because the frontend groups nodes across positions by
``{layer}_{feature}``. ``influence`` is cumulative, as circuit-tracer writes it: the share of all
(non-logit) influence held by the nodes at least as influential as this one, so the frontend's threshold
keeps the most influential nodes. A logit's ``clerp`` reads ``Output "tok" (p=0.123)``, the form the
frontend parses; ``is_target_logit`` marks the most likely one.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, Field

from dictionaries.atomic_output import write_text_atomic
from dictionaries.errors import CircuitscopeError

from .attribution_graph import AttributionGraph
from .lookup import top_logit
from .node_kinds import node_kind
from .subgraphs import cumulative_influence


class NeuronpediaOptions(BaseModel):
    """``slug`` (default: from the prompt), ``scan`` (the model's id on Neuronpedia; default: the model
    name's last path part), ``supernodes`` (name -> node ids of this graph: groupings shown by the frontend)
    and ``pinned`` node ids."""

    slug: str | None = None
    scan: str | None = None
    supernodes: dict[str, list[str]] = {}
    pinned: list[str] = []


class NPMetadata(BaseModel):
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int = 1


class NPQueryParams(BaseModel):
    pinnedIds: list[str] = []
    supernodes: list[list[str]] = []
    linkType: str = "both"
    clickedId: str = ""
    sg_pos: str = ""


class NPQKTracing(BaseModel):
    """Why an attention head attended (the schema's optional per-node ``qk_tracing_results``): pairs
    [query node, key node, contribution to the score] and each side's marginal contributors [node, contribution],
    node ids in this format (a source outside the graph keeps the id it would have). See
    :mod:`circuits.attention.qk`."""

    pair_wise_contributors: list[tuple[str, str, float]] = []
    top_q_marginal_contributors: list[tuple[str, float]] = []
    top_k_marginal_contributors: list[tuple[str, float]] = []


class NPNode(BaseModel):
    node_id: str
    jsNodeId: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None
    qk_tracing_results: NPQKTracing | None = None


class NPLink(BaseModel):
    source: str
    target: str
    weight: float


class NeuronpediaGraph(BaseModel):
    metadata: NPMetadata
    qParams: NPQueryParams = Field(default_factory=NPQueryParams)
    nodes: list[NPNode]
    links: list[NPLink]


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "graph"


def _node(graph: AttributionGraph, node: str, data: dict, negative: int) -> NPNode:
    kind, layer, pos = data["kind"], data["layer"], data["position"]
    n_layers = graph.metadata.n_layers
    if kind == "token":
        token_id = data["token_id"]
        return NPNode(node_id=f"E_{token_id}_{pos}", jsNodeId=f"E_{token_id}-{pos}", feature=pos, layer="E",
                      ctx_idx=pos, feature_type="embedding")
    if kind == "logit":
        key = node.split(":", 1)[1].rsplit("@", 1)[0]  # the token id, or "a-b" for a logit difference
        probability = data.get("probability") or 0.0
        return NPNode(node_id=f"{n_layers + 1}_{key}_{pos}", jsNodeId=f"L_{key}-{pos}",
                      feature=int(key.split("-")[0]), layer=str(n_layers + 1), ctx_idx=pos, feature_type="logit",
                      token_prob=probability, is_target_logit=node == top_logit(graph),
                      clerp=f'Output "{data.get("token")}" (p={probability:.3f})')
    feature = {"feature": data.get("feature"), "error": -1}.get(kind, negative)
    if kind == "remainder":
        clerp = f"remainder: {data.get('members')} unexpanded features"
    else:
        clerp = data.get("label") or ""
    return NPNode(node_id=f"{layer}_{feature}_{pos}", jsNodeId=f"{layer}_{feature}-{pos}", feature=feature,
                  layer=str(layer), ctx_idx=pos, feature_type=node_kind(kind).neuronpedia_type, clerp=clerp,
                  activation=data.get("activation"))


def neuronpedia_id(graph: AttributionGraph, node: str) -> str:
    """The ``node_id`` this export gives graph id ``node`` (a token, feature, error or logit id; the node need not be
    in the graph: a source named by a QK attribution may have been pruned)."""
    if node in graph.graph.nodes:
        return _node(graph, node, graph.nodes[node], -1).node_id
    kind, _, rest = node.partition(":")
    if node.startswith("token@"):
        position = int(node.split("@")[1])
        return f"E_{graph.metadata.token_ids[position]}_{position}"
    middle, _, position = rest.rpartition("@")
    if kind == "feature":
        layer, index = middle.split(":")
        return f"{layer}_{index}_{position}"
    if kind == "error":
        return f"{middle}_-1_{position}"
    raise CircuitscopeError(f"{node!r} has no Neuronpedia id outside the graph")


def to_neuronpedia(graph: AttributionGraph, options: NeuronpediaOptions | None = None,
                   qk_tracing: dict[str, NPQKTracing] | None = None) -> NeuronpediaGraph:
    """The graph in the frontend's format (see the module docstring); ``qk_tracing`` (graph node id -> QK results,
    node ids already in this format: see :func:`circuits.attention.export.neuronpedia_qk`) fills those nodes'
    ``qk_tracing_results``."""
    options = options or NeuronpediaOptions()
    meta = graph.metadata
    non_logits = [n for n, kind in graph.graph.nodes(data="kind") if kind != "logit"]
    shares = cumulative_influence(graph, non_logits)
    ids: dict[str, str] = {}
    nodes = []
    negative = -1
    for node, data in graph.nodes.items():
        if data["kind"] in ("remainder", "supernode"):
            negative -= 1
        np_node = _node(graph, node, data, negative)
        np_node.influence = shares.get(node)
        np_node.qk_tracing_results = (qk_tracing or {}).get(node)
        ids[node] = np_node.node_id
        nodes.append(np_node)
    links = [NPLink(source=ids[s], target=ids[t], weight=w) for s, t, w in graph.graph.edges(data="weight")]

    def mapped(node: str) -> str:
        if node not in ids:
            raise CircuitscopeError(f"no node {node!r} in the graph (named in the Neuronpedia options)")
        return ids[node]

    params = NPQueryParams(
        pinnedIds=[mapped(n) for n in options.pinned],
        supernodes=[[name, *map(mapped, members)] for name, members in options.supernodes.items()],
    )
    metadata = NPMetadata(
        slug=options.slug or _slug(meta.prompt), scan=options.scan or Path(meta.model).name,
        transcoder_list=[meta.dictionaries.source] if meta.dictionaries.source else [],
        prompt_tokens=meta.tokens, prompt=meta.prompt, node_threshold=meta.settings.node_threshold,
    )
    return NeuronpediaGraph(metadata=metadata, qParams=params, nodes=nodes, links=links)


def save_neuronpedia(graph: AttributionGraph, path: str | Path, options: NeuronpediaOptions | None = None,
                     qk_tracing: dict[str, NPQKTracing] | None = None) -> Path:
    """Write the frontend JSON to ``path`` (atomically)."""
    write_text_atomic(path, to_neuronpedia(graph, options, qk_tracing).model_dump_json())
    return Path(path)
