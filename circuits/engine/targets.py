"""Logit targets: which next-token logits a graph explains, and their directions in residual space.

A logit target's value is the chosen token's logit minus the mean logit over the vocabulary, read before
any softcap, so its direction is ``W_U[token] - mean_v W_U[v]`` on the final-norm output (a logit
difference uses ``W_U[a] - W_U[b]``). Its influence weight is the token's probability (1 for a difference), taken
after the family's final logit softcap, as the model's own output has it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dictionaries.errors import CircuitscopeError
from dictionaries.models.loading import LoadedModel

from ..settings import TraceSettings
from .clean_run import CleanRun


@dataclass
class LogitTargets:
    token_ids: list[int]  # for a logit difference: [a, b]
    labels: list[str]  # one per target
    probabilities: list[float]  # one per target (the token's probability; for a difference p(a))
    directions: torch.Tensor  # [k, d] float32
    weights: torch.Tensor  # [k] float32 influence weights
    values: torch.Tensor  # [k] float32 the targets' values in the clean run


def unembedding_mean(lm: LoadedModel, chunk: int = 16384) -> torch.Tensor:
    """mean_v W_U[v] [d] in float32, computed in chunks so a bf16 unembedding is never copied whole."""
    weight = lm.lm_head.weight
    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], chunk):
        total += weight[start:start + chunk].float().sum(0)
    return total / weight.shape[0]


def _single_token(lm: LoadedModel, text: str) -> int:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    unknown = lm.tokenizer.unk_token_id
    if len(ids) == 1 and ids[0] == unknown and text != lm.tokenizer.unk_token:
        raise CircuitscopeError(
            f"target {text!r} is not in {lm.name}'s vocabulary (it maps to the unknown token); name a single token"
        )
    if len(ids) != 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise CircuitscopeError(
            f"target {text!r} is not one token of {lm.name}'s vocabulary (it splits into {pieces}); "
            "name a single token, e.g. ' Paris' with its leading space"
        )
    return int(ids[0])


def select_logit_targets(lm: LoadedModel, clean: CleanRun, position: int, settings: TraceSettings) -> LogitTargets:
    logits = clean.logits_at(lm, position)
    probs = torch.softmax(lm.architecture.softcapped(lm.config, logits), dim=-1)
    W_U = lm.lm_head.weight
    if settings.logit_diff is not None:
        a, b = (_single_token(lm, t) for t in settings.logit_diff)
        direction = (W_U[a].float() - W_U[b].float())[None]
        label = f"{lm.tokenizer.decode([a])!r} - {lm.tokenizer.decode([b])!r}"
        value = (logits[a] - logits[b])[None]
        return LogitTargets([a, b], [label], [float(probs[a])], direction, torch.ones(1, device=logits.device), value)
    if settings.targets is not None:
        ids = [_single_token(lm, t) for t in settings.targets]
    else:
        top = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(top.values, 0)
        count = int((cumulative < settings.logit_prob).sum()) + 1
        ids = top.indices[: min(count, settings.max_logits)].tolist()
    mean = unembedding_mean(lm)
    index = torch.tensor(ids, device=W_U.device)
    directions = W_U[index].float() - mean
    values = logits[index] - logits.mean()
    weights = probs[index].float()
    return LogitTargets(ids, [lm.tokenizer.decode([i]) for i in ids], weights.tolist(), directions, weights, values)
