"""The frozen model of one traced prompt, rebuilt for questions about its attention, and its node names.

A graph file records the prompt, the model, the dictionary set and the trace settings; :func:`state_from_graph`
runs that prompt forward again (no adjacency rows) to get the clean run, the replacement (active features,
their decoder writes, errors), the node layout and the linear backward pass that the graph's edges came from.
Node ids are the graph's (``token@p``, ``feature:L:I@p``, ``error:L@p``, ``logit:T@p``; see
:mod:`circuits.graph.attribution_graph`); :meth:`TraceState.node` turns one into an index of the layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from dictionaries.dictionary_set import DictionarySet
from dictionaries.errors import CircuitscopeError
from dictionaries.models.loading import LoadedModel

from ..engine.attribution import prepare_attribution
from ..engine.clean_run import CleanRun
from ..engine.edge_rows import EdgeRowComputer
from ..engine.linear_backward import FrozenLinearBackward
from ..engine.node_layout import ERROR, FEATURE, LOGIT, TOKEN, NodeLayout
from ..engine.replacement import Replacement
from ..engine.targets import LogitTargets
from ..graph.attribution_graph import AttributionGraph
from ..settings import TraceSettings

_ID = re.compile(r"^(token|feature|error|logit|remainder):?([^@]*)@(\d+)$")


@dataclass(frozen=True)
class Node:
    """One node of the layout: ``index`` (sources: a column of the adjacency), ``kind`` (TOKEN...), ``layer``
    (-1 for tokens, n_layers for logits), ``position``, ``id`` (the graph's id); for a feature ``feature``, its
    number among the active features, and for a logit ``logit``, which of the logit targets it is."""

    index: int
    kind: int
    layer: int
    position: int
    id: str
    feature: int | None = None
    logit: int | None = None


def check_node_id(node_id: str, n_positions: int) -> None:
    """Refuse, before any model is loaded, an id that names no token, feature, error or logit of a prompt of
    ``n_positions`` tokens."""
    match = _ID.match(node_id)
    if match is None or match.group(1) == "remainder":
        raise CircuitscopeError(f"{node_id!r} is not a token, feature, error or logit id (token@P, feature:L:I@P, "
                                "error:L@P, logit:T@P)")
    if int(match.group(3)) >= n_positions:
        raise CircuitscopeError(f"{node_id!r}: position outside the prompt's {n_positions} tokens")


class TraceState:
    """Everything the frozen linear model of one prompt needs (see the module docstring)."""

    def __init__(self, lm: LoadedModel, dicts: DictionarySet, prompt: str, settings: TraceSettings):
        self.lm, self.dicts, self.settings = lm, dicts, settings
        prepared = prepare_attribution(lm, dicts, prompt, settings)
        self.clean: CleanRun = prepared.clean
        self.replacement: Replacement = prepared.replacement
        self.layout: NodeLayout = prepared.layout
        self.logits: LogitTargets = prepared.logits
        self.rows: EdgeRowComputer = prepared.rows
        self.backward: FrozenLinearBackward = prepared.rows.backward
        self.position: int = prepared.position
        self.input_ids = prepared.input_ids[0]
        self.tokens = [lm.tokenizer.decode([i]) for i in self.input_ids.tolist()]
        self.n_heads, self.n_kv, self.head_dim = lm.architecture.heads(lm.config)

    @property
    def n_layers(self) -> int:
        return len(self.clean.layers)

    @cached_property
    def _feature_of(self) -> dict[tuple[int, int, int], int]:
        f = self.replacement.features
        return {(layer, index, pos): k for k, (layer, index, pos)
                in enumerate(zip(f.layer.tolist(), f.index.tolist(), f.position.tolist(), strict=True))}

    @cached_property
    def _feature_at_node(self) -> torch.Tensor:
        """[n_nodes] the active feature number of each feature node (-1 elsewhere)."""
        lay = self.layout
        inverse = torch.full((lay.n_nodes,), -1, dtype=torch.long)
        inverse[lay.feature_node.cpu()] = torch.arange(len(lay.feature_node))
        return inverse

    def node(self, node_id: str) -> Node:
        """The layout node of a graph id; a clear error for an id this prompt's model has no such node for."""
        match = _ID.match(node_id)
        if match is None:
            raise CircuitscopeError(f"{node_id!r} is not a node id (token@P, feature:L:I@P, error:L@P, logit:T@P)")
        kind, middle, position = match.group(1), match.group(2), int(match.group(3))
        lay = self.layout
        if position >= len(self.tokens):
            raise CircuitscopeError(f"{node_id!r}: position {position} is outside the prompt's {len(self.tokens)} "
                                    "tokens")
        if kind == "token":
            return Node(int(lay.token_node[position]), TOKEN, -1, position, node_id)
        if kind == "feature":
            layer, index = (int(x) for x in middle.split(":"))
            k = self._feature_of.get((layer, index, position))
            if k is None:
                raise CircuitscopeError(f"{node_id!r} is not active in this run of the prompt (other dictionaries "
                                        "or dtype than the trace's?)")
            return Node(int(lay.feature_node[k]), FEATURE, layer, position, node_id, feature=k)
        if kind == "error":
            layer = int(middle)
            index = int(lay.error_node[layer, position]) if 0 <= layer < self.n_layers else -1
            if index < 0:
                raise CircuitscopeError(f"{node_id!r}: no error node there (a constant position?)")
            return Node(index, ERROR, layer, position, node_id)
        if kind == "logit":
            token_ids = self.logits.token_ids
            key = f"{token_ids[0]}-{token_ids[1]}" if self.settings.logit_diff else None
            for j in range(len(self.logits.labels)):
                if middle == (key if key is not None else str(token_ids[j])) and position == self.position:
                    return Node(int(lay.logit_node[j]), LOGIT, self.n_layers, position, node_id, logit=j)
            raise CircuitscopeError(f"{node_id!r} is not one of this trace's logit targets")
        raise CircuitscopeError(f"{node_id!r}: a remainder folds unexpanded features; name one of its features")

    def name(self, index: int) -> str:
        """The graph id of source node ``index``."""
        lay = self.layout
        kind, layer, position = int(lay.kind[index]), int(lay.layer[index]), int(lay.position[index])
        if kind == TOKEN:
            return f"token@{position}"
        if kind == ERROR:
            return f"error:{layer}@{position}"
        k = int(self._feature_at_node[index])
        return f"feature:{layer}:{int(self.replacement.features.index[k])}@{position}"

    def target_seed(self, target: Node) -> tuple[int, torch.Tensor, bool]:
        """(layer, seed [1, p + 1, d], on_output): the target's gradient row. A logit's row sits on the residual
        after the last layer (``on_output`` True); a feature's joins before its layer's MLP (§3.4)."""
        device = self.clean.embeddings.device
        d = self.clean.embeddings.shape[1]
        seed = torch.zeros(1, target.position + 1, d, device=device)
        if target.kind == LOGIT:
            direction = self.logits.directions[target.logit].to(device)
            seed[0, target.position] = direction * self.backward.s_final[target.position].to(device)
            return self.n_layers - 1, seed, True
        if target.kind != FEATURE:
            raise CircuitscopeError(f"{target.id} is not a target (a feature or a logit)")
        encoder = self.rows.encoder_vectors[torch.tensor([target.feature], device=device)][0]
        seed[0, target.position] = encoder * self.backward.layers[target.layer].s_pre[target.position].to(device)
        return target.layer, seed, False


def state_for_prompt(lm: LoadedModel, dicts: DictionarySet, prompt: str,
                     settings: TraceSettings | None = None) -> TraceState:
    return TraceState(lm, dicts, prompt, settings or TraceSettings())


def state_from_graph(graph: AttributionGraph, lm: LoadedModel, dicts: DictionarySet) -> TraceState:
    """The state of the trace that made ``graph``, with ``lm`` and ``dicts`` (load them as the graph names them:
    ``metadata.model``, ``metadata.dictionaries.source``); checks that the prompt tokenizes as it did."""
    meta = graph.metadata
    state = TraceState(lm, dicts, meta.prompt, meta.settings)
    if state.input_ids.tolist() != list(meta.token_ids):
        raise CircuitscopeError("the graph's prompt tokenizes differently with this model: load the graph's own model "
                                f"({meta.model})")
    return state
