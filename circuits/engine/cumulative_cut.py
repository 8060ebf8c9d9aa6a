"""The cut of a cumulative threshold over scores too many to sort: exact, in three passes, one block in memory.

Pruning keeps the highest scores whose cumulative sum reaches ``threshold`` of the total. Sorting every score of a
long prompt's adjacency (billions of edges) would hold a float32 copy and int64 indices of all of them. Instead:

1. one pass: the total, and the smallest and largest positive score;
2. one pass: a histogram of the positive scores over ``bins`` bins of equal width in log2(score), with the count and
   the sum of each bin; from the top bin down, the bin where the cumulative sum reaches the target holds the cut;
3. one pass: the scores of that bin only, sorted; the cut is found among them exactly.

Only the scores of one bin are ever held together (a small share of all: the bins are log-spaced over the scores'
range). The answer equals sorting everything, up to the order in which float64 sums are added.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

Scores = Callable[[], Iterable[torch.Tensor]]  # each call yields the score blocks again (any shapes, float)


def _bin_of(scores: torch.Tensor, low: float, span: float, bins: int) -> torch.Tensor:
    """The bin [len] long of each positive score: 0 holds the largest scores, bins - 1 the smallest."""
    if span == 0:
        return torch.zeros_like(scores, dtype=torch.long)
    position = (math.log2(low) + span - torch.log2(scores.double())) / span * bins
    return position.long().clamp_(0, bins - 1)


def cumulative_cut(scores: Scores, threshold: float, bins: int = 1 << 16) -> float:
    """The smallest score among the top scores whose cumulative sum reaches ``threshold`` of the total of all
    positive scores; ``inf`` when there is no positive score. ``threshold >= 1`` keeps every positive score (float
    rounding must not cut the tail): the answer is the smallest positive score."""
    total, low, high = 0.0, math.inf, 0.0
    for block in scores():
        positive = block[block > 0]
        if positive.numel():
            total += float(positive.double().sum())
            low = min(low, float(positive.min()))
            high = max(high, float(positive.max()))
    if total == 0.0:
        return math.inf
    if threshold >= 1.0:
        return low
    span = math.log2(high) - math.log2(low)
    counts = torch.zeros(bins, dtype=torch.long)
    sums = torch.zeros(bins, dtype=torch.float64)
    for block in scores():
        positive = block[block > 0]
        if positive.numel():
            where = _bin_of(positive, low, span, bins).cpu()
            counts += torch.bincount(where, minlength=bins)
            sums += torch.bincount(where, weights=positive.double().cpu(), minlength=bins)
    above = torch.cumsum(sums, 0)  # cumulative sum of the bins from the largest scores down
    target = threshold * float(above[-1])  # the histogram's own total: the boundary bin is never empty
    boundary = min(int(torch.searchsorted(above, torch.tensor([target], dtype=torch.float64))), bins - 1)
    before = float(above[boundary - 1]) if boundary > 0 else 0.0
    chosen = []
    for block in scores():
        positive = block[block > 0]
        if positive.numel():
            chosen.append(positive[_bin_of(positive, low, span, bins) == boundary].double().cpu())
    ordered = torch.sort(torch.cat(chosen), descending=True).values
    index = int(torch.searchsorted(before + torch.cumsum(ordered, 0), torch.tensor([target], dtype=torch.float64)))
    return float(ordered[min(index, len(ordered) - 1)])
