"""The words that explain a feature, scored from its top contexts against the corpus's token frequencies.

A feature's n top contexts each keep a window of tokens around the maximum with the feature's activation on
them (:mod:`dictionaries.labels.format`). Each token occurrence i of top context k gets a weight

    w(k, i) = a(k, i) / max_k  +  NEAR / (1 + |i - peak_k|)

(the activation relative to that context's maximum, so the token the feature fires on weighs 1 plus NEAR,
plus a small share for the words around it that decays with distance; NEAR = 0.25). Token v's share of the
feature is ``share(v) = sum of w over v's occurrences / sum of all w`` and its score is a tf-idf against
the annotated corpus (N non-BOS tokens, count(v) occurrences of v among them):

    score(v) = share(v) * ln((N + 1) / (count(v) + 1))

so a token as common as "." or " the" needs a much larger share to beat a rarer token specific to the
feature. BOS (position 0 of a context) is not counted; tokens that are only whitespace or punctuation, and
tokens with score <= 0, are not listed. Ties
go to the token seen first (strongest context first, left to right).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEAR = 0.25


@dataclass(frozen=True)
class CorpusCounts:
    """``counts`` [V'] int64: occurrences of each token id among the corpus's non-BOS tokens (ids past the
    end occur 0 times); ``tokens``: N, the number of those tokens."""

    counts: torch.Tensor
    tokens: int

    @classmethod
    def of(cls, token_ids: torch.Tensor) -> CorpusCounts:
        """Counts of a corpus [C, T] whose position 0 is BOS."""
        body = token_ids[:, 1:].reshape(-1).long()
        return cls(torch.bincount(body) if body.numel() else torch.zeros(0, dtype=torch.long), int(body.numel()))

    def count(self, token_id: int) -> int:
        return int(self.counts[token_id]) if 0 <= token_id < self.counts.shape[0] else 0

    def idf(self, token_id: int) -> float:
        return math.log((self.tokens + 1) / (self.count(token_id) + 1))


def is_wordlike(token: str) -> bool:
    """True when the token holds a letter, digit or symbol, not only whitespace and punctuation."""
    return any(not (c.isspace() or unicodedata.category(c).startswith("P")) for c in token)


def context_word_scores(
    contexts: Sequence, counts: CorpusCounts, limit: int = 5
) -> list[tuple[int, str, float]]:
    """(token id, token text, score) of the ``limit`` best-scored tokens of ``contexts`` (``TopContext``s,
    strongest first), best first; rule in the module docstring."""
    weight: dict[int, float] = {}
    text: dict[int, str] = {}
    total = 0.0
    for ctx in contexts:
        top = max(ctx.max_activation, 1e-12)
        for i, (token_id, token, act) in enumerate(zip(ctx.token_ids, ctx.tokens, ctx.activations, strict=True)):
            if ctx.position - ctx.peak + i == 0:  # BOS, not text
                continue
            w = max(act, 0.0) / top + NEAR / (1 + abs(i - ctx.peak))
            total += w
            if is_wordlike(token):
                weight[token_id] = weight.get(token_id, 0.0) + w
                text.setdefault(token_id, token)
    if total <= 0:
        return []
    scored = [(token_id, text[token_id], w / total * counts.idf(token_id)) for token_id, w in weight.items()]
    scored = [s for s in scored if s[2] > 0]
    scored.sort(key=lambda s: -s[2])  # stable: ties keep first-seen order
    return scored[:limit]
