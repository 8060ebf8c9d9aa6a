"""``trace``: prompt in, pruned :class:`~circuits.graph.attribution_graph.AttributionGraph` out.

attribute (adjacency rows) -> fold unexpanded features into remainders -> prune -> scores -> networkx graph.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from dictionaries.dictionary_set import DictionarySet
from dictionaries.labels import FeatureLabels, fingerprint
from dictionaries.models.loading import LoadedModel

from .engine.attribution import Attribution, attribute
from .engine.edge_rows import RowBlock
from .engine.exact_edges import Recompute, kept_edges
from .engine.influence import graph_scores, node_influence
from .engine.node_layout import ERROR, FEATURE, LOGIT, TOKEN
from .engine.pruning import (
    PrunedGraph,
    RemainderGroup,
    Remainders,
    prune,
    remainder_influence,
)
from .graph.attribution_graph import (
    AttributionGraph,
    DictionaryInfo,
    GraphMetadata,
    NodeData,
    PlanEstimate,
    Scores,
)
from .graph.graph_table import EdgeColumns, GraphTable
from .graph.labels import label_graph
from .graph.unpruned import removed_by_pruning
from .settings import TraceSettings


def trace(
    lm: LoadedModel,
    dicts: DictionarySet,
    prompt: str,
    settings: TraceSettings | None = None,
    progress: bool = False,
    dictionaries_source: str | None = None,
    labels: FeatureLabels | None = None,
) -> AttributionGraph:
    """Attribute ``prompt``'s logit targets through ``dicts`` spliced into ``lm`` and return the pruned graph.

    ``labels`` (the dictionaries' feature labels, :class:`~dictionaries.labels.FeatureLabels`) label the feature
    nodes and put the features' top contexts into ``metadata.feature_info`` (see :mod:`circuits.graph.labels`);
    labels made for other weights than ``dicts`` are refused before any work."""
    settings = settings or TraceSettings()
    if labels is not None:
        labels.check_matches(fingerprint(dicts), dictionaries_source or "these dictionaries")
    start = time.perf_counter()
    result = attribute(lm, dicts, prompt, settings, progress=progress)
    features = result.replacement.features
    layout = result.layout
    weights = result.logits.weights.to(result.blocks[0].values.device)
    influence_before_folding = node_influence(result.blocks, layout, weights)
    remainders = Remainders(layout, features.layer, features.position, result.expanded)
    remainders.fold(result.blocks)
    groups = remainders.groups
    folded_away = remainders.folded_away(layout.n_nodes)
    # without remainders folding changed nothing, so the influence already computed is the unpruned one
    unpruned = graph_scores(result.blocks, layout, weights, None if groups else influence_before_folding)
    rounded = result.rounded  # (read before pruning consumes the rows; keep_unpruned keeps them for the file)
    pruned = prune(result.blocks, layout, weights, settings.node_threshold, settings.edge_threshold, folded_away,
                   influence=remainder_influence(influence_before_folding, layout, groups),
                   consume=not settings.keep_unpruned)
    kept = graph_scores(pruned.blocks, layout, weights)
    result.timings["prune"] = time.perf_counter() - start - sum(result.timings.values())
    result.timings["total"] = time.perf_counter() - start
    metadata = GraphMetadata(
        prompt=prompt,
        tokens=result.tokens,
        token_ids=result.input_ids.tolist(),
        target_position=result.position,
        model=lm.name,
        n_layers=lm.n_layers,
        dictionaries=DictionaryInfo(
            kind=dicts.kind, n_layers=dicts.n_layers, d_model=dicts.d_model, widths=dicts.widths,
            activation=dicts.config.activation.describe(), source=dictionaries_source,
        ),
        settings=settings,
        scores=Scores(replacement=kept.replacement, completeness=kept.completeness,
                      replacement_unpruned=unpruned.replacement, completeness_unpruned=unpruned.completeness),
        n_active_features=result.n_features,
        n_expanded_features=int(result.expanded.sum()),
        timings={k: round(v, 4) for k, v in result.timings.items()},
        plan=None if result.plan is None else PlanEstimate(
            peak_bytes=result.plan.peak_bytes, adjacency_bytes=result.plan.adjacency_bytes,
            seconds=round(result.plan.seconds, 3), batch_size=result.plan.batch_size,
            recompute_seconds=round(result.plan.recompute_seconds, 3)),
    )
    recompute = None
    if rounded:  # the kept edges' weights recomputed in float32 (circuits.engine.exact_edges)
        def recompute(row_ids: torch.Tensor) -> list[RowBlock]:
            blocks = result.recompute_rows(row_ids)
            remainders.fold(blocks)
            return blocks
    graph = AttributionGraph(_build_table(result, pruned, groups, recompute), metadata)
    if settings.keep_unpruned:  # the whole graph, minus what the pruned one holds
        everything = PrunedGraph(result.blocks, torch.ones_like(pruned.node_mask), pruned.influence)
        # (the edges pruning removed keep their stored weights: bfloat16-rounded when the rows were stored so)
        graph.unpruned = removed_by_pruning(_build_table(result, everything, groups).to_networkx(), graph.graph)
    if labels is not None:
        label_graph(graph, labels)
    return graph


def _build_table(result: Attribution, pruned: PrunedGraph, groups: list[RemainderGroup],
                 recompute: Recompute | None = None) -> GraphTable:
    """The graph of ``pruned`` as columns (nodes in layout order, edges as kept); ``recompute`` gives exact rows
    when the stored ones are rounded. No per-edge Python object is made: a budgeted long trace keeps ~1M edges."""
    layout = result.layout
    features = result.replacement.features
    feature_of_node = {int(node): k for k, node in enumerate(layout.feature_node.tolist())}
    group_of_node = {g.node: g for g in groups}
    target_nodes = layout.target_nodes
    # target values: a feature's encoder pre-activation x @ W_enc + b_enc (what its incoming edges add up to with
    # the constant terms: biases, b_enc, constant positions), a logit's value
    values = torch.cat([result.replacement.feature_pre_activations.cpu(), result.logits.values.cpu()])
    influence = pruned.influence.cpu()

    # edges first: a node is drawn when it is a token or logit, or has at least one kept edge
    rows, sources, weights = kept_edges(pruned.blocks, len(target_nodes), recompute, result.settings.batch_size)
    targets = target_nodes.cpu()[rows]
    present = torch.cat([sources, targets, layout.token_node.cpu(), layout.logit_node.cpu()]).unique()  # sorted

    ids: dict[int, str] = {}
    nodes: dict[str, dict] = {}
    target_row = {int(node): row for row, node in enumerate(target_nodes.tolist())}
    for node in present.tolist():
        kind = int(layout.kind[node])
        position = int(layout.position[node])
        layer = int(layout.layer[node])
        attrs: dict = {"layer": layer, "position": position, "influence": float(influence[node])}
        if node in target_row:
            attrs["value"] = float(values[target_row[node]])
        if kind == TOKEN:
            ids[node] = f"token@{position}"
            attrs.update(kind="token", token=result.tokens[position], token_id=int(result.input_ids[position]))
        elif kind == ERROR:
            ids[node] = f"error:{layer}@{position}"
            attrs.update(kind="error")
        elif kind == LOGIT:
            j = node - layout.logit_node[0].item()
            token_ids = result.logits.token_ids
            key = f"{token_ids[0]}-{token_ids[1]}" if result.settings.logit_diff else str(token_ids[j])
            ids[node] = f"logit:{key}@{position}"
            attrs.update(kind="logit", token=result.logits.labels[j], probability=result.logits.probabilities[j],
                         token_id=None if result.settings.logit_diff else token_ids[j])
        elif node in group_of_node:
            group = group_of_node[node]
            ids[node] = f"remainder:{layer}@{position}"
            attrs.update(kind="remainder", members=len(group.features),
                         activation=float(features.activation[group.features].sum()))
        else:
            assert kind == FEATURE
            k = feature_of_node[node]
            index = int(features.index[k])
            ids[node] = f"feature:{layer}:{index}@{position}"
            attrs.update(kind="feature", feature=index, feature_key=f"{layer}:{index}",
                         activation=float(features.activation[k]))
        nodes[ids[node]] = NodeData(id=ids[node], **attrs).model_dump(exclude={"id"})
    place = torch.full((int(present.max()) + 1,), -1, dtype=torch.long)
    place[present] = torch.arange(len(present))  # layout node -> its place in ``nodes``
    source_at, target_at = place[sources].numpy(), place[targets].numpy()
    # by source, then target: the order networkx lists the edges of a graph built from these columns, so a graph
    # saved before and after its networkx graph is built has the same bytes and hash
    order = np.lexsort((target_at, source_at))
    return GraphTable(nodes, EdgeColumns(source_at[order].astype(np.int32), target_at[order].astype(np.int32),
                                         weights.numpy()[order].astype(np.float32)))
