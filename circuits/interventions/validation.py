"""Validate an attribution graph with interventions: for each of its most influential feature nodes, compare
the change of the target logit that the graph predicts when the node is removed with the change measured by
zeroing that feature (at its position) in the model.

**Prediction.** Edges are direct effects in the frozen linear replacement model, and a feature's outgoing
edges are proportional to its activation a_j, which follows its pre-activation with slope 1 while active
(JumpReLU, ReLU). So removing node n moves the target T by ``-v_n``, where

    v_n = sum over edges n -> m of  w(n -> m) * (1 if m is T;  v_m / a_m if m is a feature;  0 otherwise)

is the sum over every path from n to T of the product of its edge weights, each after the first divided by
the activation of the feature it leaves: the row of (I - A D^-1)^-1 A for T, with D the activations. One sweep
in reverse topological order computes it for every node. It is exact for the model with frozen attention
patterns and norm scales, fixed errors and linear features
(``InterventionSettings(freeze_attention=True, freeze_norms=True, features="linear")``) when the graph is
whole: traced with ``keep_unpruned`` (the prediction then uses the unpruned graph) and without a feature
budget (unexpanded features have no incoming edges, so paths through them are missing). On a pruned graph it
counts the paths that pruning kept; the report says which graph it used.

**Measurement**, in each mode of :data:`MODES`: ``"linear"`` (the graph's own model, so agreement checks the
attribution math), ``"frozen"`` (attention and norms frozen, features recomputed through their activation
function) and ``"free"`` (nothing frozen: the model with the dictionaries and errors spliced in). The measured
change is the target's value with the feature zeroed minus its value without, where the value is what the
graph's logit node holds: the token's logit minus the mean logit (logit(a) - logit(b) for a difference) at
the graph's target position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import networkx as nx
import torch

from dictionaries.dictionary_set import DictionarySet
from dictionaries.errors import CircuitscopeError
from dictionaries.models.loading import LoadedModel
from dictionaries.models.tokenization import constant_positions

from ..graph.attribution_graph import AttributionGraph
from ..graph.lookup import require_node, top_logit
from ..graph.unpruned import full_graph
from .feature_interventions import (
    FeatureIntervention,
    InterventionSettings,
    activation_at,
    prepare_clean_state,
    run_replacement,
    unembed,
)

ValidationMode = Literal["linear", "frozen", "free"]
MODES: dict[str, InterventionSettings] = {
    "linear": InterventionSettings(freeze_attention=True, freeze_norms=True, features="linear"),
    "frozen": InterventionSettings(freeze_attention=True, freeze_norms=True, features="recompute"),
    "free": InterventionSettings(),
}


@dataclass
class ValidationRow:
    node: str
    layer: int
    position: int
    feature: int
    activation: float  # in the graph
    model_activation: float  # in this clean run (differs when the dictionaries or dtype differ from the trace's)
    influence: float
    direct: float  # the change that the direct edge alone predicts: -w(node -> target)
    predicted: float  # the change that the graph predicts (all paths)
    measured: dict[str, float]  # mode -> measured change


@dataclass
class Agreement:
    """Agreement of predicted and measured changes over the rows: Pearson correlation (None with fewer than
    two rows or no variance), the fraction of rows whose signs agree, and the largest absolute difference."""

    pearson: float | None
    sign_agreement: float
    max_abs_difference: float


@dataclass
class ValidationReport:
    target: str  # the logit node
    target_label: str
    target_position: int
    clean_value: float  # the target's value in this clean run
    graph_value: float | None  # the value stored in the graph
    graph_part: Literal["unpruned", "pruned"]  # which graph the predictions come from
    modes: list[str]
    rows: list[ValidationRow]
    agreement: dict[str, Agreement]  # mode -> agreement


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 2:
        return None
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float(x @ y) / denominator if denominator > 0 else None


def agreement(predicted: Sequence[float], measured: Sequence[float]) -> Agreement:
    pairs = list(zip(predicted, measured, strict=True))
    signs = sum((p > 0) == (m > 0) and (p < 0) == (m < 0) for p, m in pairs)
    return Agreement(pearson(predicted, measured), signs / len(pairs) if pairs else 0.0,
                     max((abs(p - m) for p, m in pairs), default=0.0))


def predicted_removal_effects(graph: AttributionGraph, target: str) -> dict[str, float]:
    """The change of ``target`` that the graph predicts when each node is removed (see the module docstring);
    nodes with no path to the target get 0."""
    g = graph.graph
    require_node(graph, target)
    if graph.nodes_of_kind("supernode"):
        raise CircuitscopeError("the graph has supernodes; validate the graph as traced, before merging nodes")
    per_unit: dict[str, float] = {}  # v_m / a_m for features, 1 for the target
    effect: dict[str, float] = {}
    for node in reversed(list(nx.topological_sort(g))):
        if node == target:
            per_unit[node] = 1.0
            continue
        total = sum(data["weight"] * per_unit.get(m, 0.0) for _, m, data in g.out_edges(node, data=True))
        effect[node] = -total
        data = g.nodes[node]
        if data["kind"] == "feature" and g.in_degree(node) and data.get("activation"):
            per_unit[node] = total / data["activation"]
    return effect


def _target_reader(graph: AttributionGraph, target: str) -> tuple[int, int, int | None]:
    """(position, token a, token b or None) of a logit node: its value is logit(a) - (logit(b) or the mean)."""
    data = graph.nodes[target]
    if data["kind"] != "logit":
        raise CircuitscopeError(f"{target!r} is not a logit node; name one of {sorted(graph.logit_nodes)}")
    key = target[len("logit:"): target.rindex("@")]
    a, _, b = key.partition("-")
    return data["position"], int(a), int(b) if b else None


def validate_graph(lm: LoadedModel, dicts: DictionarySet, graph: AttributionGraph, top: int = 20,
                   target: str | None = None, modes: Sequence[str] = tuple(MODES)) -> ValidationReport:
    """Predicted vs measured removal effects of the ``top`` most influential feature nodes on ``target``
    (default: the most likely logit), measured in each of ``modes`` (keys of :data:`MODES`)."""
    meta = graph.metadata
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise CircuitscopeError(f"unknown validation mode(s) {unknown}; choose from {', '.join(MODES)}")
    if top < 1:
        raise CircuitscopeError(f"top must be at least 1, got {top}")
    if meta.n_layers != lm.n_layers or meta.dictionaries.widths != dicts.widths or meta.dictionaries.kind != dicts.kind:
        raise CircuitscopeError(
            f"the graph was traced with {meta.n_layers} layers and {meta.dictionaries.kind} dictionaries of widths "
            f"{meta.dictionaries.widths}; pass the model ({meta.model}) and dictionaries that traced it")
    target = target or top_logit(graph)
    require_node(graph, target)
    position, token_a, token_b = _target_reader(graph, target)
    whole = full_graph(graph)
    effects = predicted_removal_effects(whole, target)
    nodes = sorted(graph.nodes_of_kind("feature"), key=lambda n: -graph.nodes[n]["influence"])[:top]
    if not nodes:
        raise CircuitscopeError("the graph has no feature nodes to validate")

    ids = torch.tensor(meta.token_ids)
    constant = constant_positions(lm, ids[None], meta.prompt, meta.settings.chat)
    state = prepare_clean_state(lm, dicts, ids, constant)

    def value(run_hidden: torch.Tensor) -> float:
        logits = unembed(lm, run_hidden[position])
        return float(logits[token_a] - (logits[token_b] if token_b is not None else logits.mean()))

    base = {mode: value(run_replacement(lm, dicts, state, (), MODES[mode]).final_hidden) for mode in modes}
    rows = []
    for node in nodes:
        data = graph.nodes[node]
        ablation = [FeatureIntervention.ablate(data["layer"], data["feature"], data["position"])]
        measured = {mode: value(run_replacement(lm, dicts, state, ablation, MODES[mode]).final_hidden) - base[mode]
                    for mode in modes}
        direct = whole.graph.edges[node, target]["weight"] if whole.graph.has_edge(node, target) else 0.0
        rows.append(ValidationRow(
            node=node, layer=data["layer"], position=data["position"], feature=data["feature"],
            activation=data["activation"], influence=data["influence"],
            model_activation=activation_at(state.replacement.features, data["layer"], data["feature"],
                                           data["position"]),
            direct=-direct, predicted=effects.get(node, 0.0), measured=measured,
        ))
    clean_logits = unembed(lm, state.clean.final_hidden[position])
    clean_value = float(clean_logits[token_a] - (clean_logits[token_b] if token_b is not None else clean_logits.mean()))
    return ValidationReport(
        target=target, target_label=graph.nodes[target].get("token") or target, target_position=position,
        clean_value=clean_value, graph_value=graph.nodes[target].get("value"),
        graph_part="unpruned" if graph.unpruned is not None else "pruned", modes=list(modes), rows=rows,
        agreement={mode: agreement([r.predicted for r in rows], [r.measured[mode] for r in rows]) for mode in modes},
    )
