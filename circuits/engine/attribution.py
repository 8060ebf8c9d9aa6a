"""Attribution: from a prompt, a model and a dictionary set to the adjacency of the attribution graph.

Steps: one clean forward pass (:mod:`circuits.engine.clean_run`), the replacement model's features and errors
(:mod:`circuits.engine.replacement`), the node numbering (:mod:`circuits.engine.node_layout`), then adjacency rows for
the logit targets and the features (:mod:`circuits.engine.edge_rows`). With a feature budget, features are
expanded in order of their current influence on the logits (recomputed after every batch); the rest
keep their outgoing edges but get no rows, and the graph folds them into remainder nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dictionaries.dictionary_set import DictionarySet
from dictionaries.errors import CircuitscopeError
from dictionaries.models.loading import LoadedModel
from dictionaries.models.tokenization import tokenize_prompt

from ..settings import TraceSettings
from .clean_run import CleanRun, record_clean_run
from .edge_rows import EdgeRowComputer, RowBlock
from .influence import node_influence
from .linear_backward import FrozenLinearBackward
from .node_layout import NodeLayout, build_layout
from .replacement import Replacement, build_replacement
from .targets import LogitTargets, select_logit_targets


@dataclass
class Attribution:
    """Everything one attribution computed. Rows of the adjacency are indexed by target number: active
    feature k is row k, logit target j is row n_features + j (see ``layout.target_nodes``)."""

    prompt: str
    input_ids: torch.Tensor  # [P]
    tokens: list[str]
    position: int
    clean: CleanRun
    replacement: Replacement
    layout: NodeLayout
    logits: LogitTargets
    blocks: list[RowBlock]
    expanded: torch.Tensor  # [n_features] bool: features whose rows were computed
    settings: TraceSettings
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.replacement.features)


def attribute(
    lm: LoadedModel,
    dicts: DictionarySet,
    prompt: str,
    settings: TraceSettings | None = None,
    progress: bool = False,
) -> Attribution:
    """Compute the attribution adjacency for ``prompt`` (see the module docstring)."""
    settings = settings or TraceSettings()
    dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tokenized = tokenize_prompt(lm, prompt, settings.chat)
    input_ids = tokenized.ids[None]
    n_positions = tokenized.n_positions
    position = settings.position if settings.position is not None else n_positions - 1
    if position < 0:
        position += n_positions
    if not 0 <= position < n_positions:
        raise CircuitscopeError(
            f"position {settings.position} is outside the prompt's {n_positions} tokens; pass 0..{n_positions - 1}"
        )
    device = lm.device
    clean = record_clean_run(lm, input_ids)
    constant = tokenized.constant.to(device)
    replacement = build_replacement(clean, dicts, constant)
    features = replacement.features
    logits = select_logit_targets(lm, clean, position, settings)
    layout = build_layout(features, lm.n_layers, ~constant.cpu(), len(logits.labels), position)
    timings["forward"] = time.perf_counter() - start

    start = time.perf_counter()
    backward = FrozenLinearBackward(lm, clean, dicts, constant, device)
    encoders = torch.zeros(len(features), lm.d_model, device=device)
    for layer in range(lm.n_layers):
        ids = (features.layer == layer).nonzero().flatten()
        if len(ids):
            weight = dicts.encoder_weight(layer)
            encoders[ids] = weight[:, features.index[ids].to(weight.device)].T.float().to(device)
    rows = EdgeRowComputer(backward, layout, replacement, clean.embeddings.to(device), encoders)
    n_features = len(features)
    blocks = [rows.logit_rows(logits.directions.to(device), position,
                              torch.arange(n_features, n_features + len(logits.labels), device=device))]
    budget = n_features if settings.max_features is None else min(settings.max_features, n_features)
    expanded = torch.zeros(n_features, dtype=torch.bool, device=device)
    bar = tqdm(total=budget, desc="attribution", unit="feature", disable=not progress, leave=False)
    if budget == n_features:  # no budget: expand everything, in layer order
        for chosen in torch.arange(n_features, device=device).split(settings.batch_size):
            blocks.extend(rows.feature_rows(chosen))
            bar.update(len(chosen))
        expanded[:] = True
    else:
        ranking = torch.zeros(0, dtype=torch.long, device=device)
        since_ranking = 0
        while int(expanded.sum()) < budget:
            # Re-rank by current influence on the logits whenever the rows added since the last ranking
            # reach a batch or a quarter of all expanded rows: O(log budget) sweeps instead of one per batch.
            if len(ranking) == 0 or since_ranking >= max(settings.batch_size, int(expanded.sum()) // 4):
                influence = node_influence(blocks, layout, logits.weights.to(device))[layout.feature_node.to(device)]
                influence[expanded] = -1.0
                ranking = torch.argsort(influence, descending=True)[: budget - int(expanded.sum())]
                since_ranking = 0
            chosen, ranking = ranking[: settings.batch_size], ranking[settings.batch_size:]
            blocks.extend(rows.feature_rows(chosen))
            expanded[chosen] = True
            since_ranking += len(chosen)
            bar.update(len(chosen))
    bar.close()
    timings["attribution"] = time.perf_counter() - start
    tokens = [lm.tokenizer.decode([i]) for i in input_ids[0].tolist()]
    return Attribution(prompt, input_ids[0], tokens, position, clean, replacement, layout, logits, blocks,
                       expanded, settings, timings)

