"""The cumulative cut over score blocks (circuits/engine/cumulative_cut.py) equals sorting every score, and sorts
only a small share of them."""

from __future__ import annotations

import math

import pytest
import torch

from circuits.engine.cumulative_cut import cumulative_cut


def sorted_cut(scores: torch.Tensor, threshold: float) -> float:
    """The reference: sort every positive score (what pruning did before)."""
    positive = scores[scores > 0].double()
    if positive.numel() == 0:
        return math.inf
    ordered = torch.sort(positive, descending=True).values
    if threshold >= 1.0:
        return float(ordered[-1])
    cumulative = torch.cumsum(ordered, 0)
    index = int(torch.searchsorted(cumulative, threshold * cumulative[-1]))
    return float(ordered[min(index, len(ordered) - 1)])


def _blocks(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.exp(3 * torch.randn(rows, width, generator=gen)) for rows, width in ((7, 300), (40, 1000), (1, 5))]
    blocks[0][:, ::3] = 0.0  # pruned edges
    blocks[1][5] = 2.5  # a run of ties
    blocks.append(torch.zeros(3, 4))  # a block with nothing positive
    return blocks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.01, 0.5, 0.8, 0.98, 0.999999, 1.0])
def test_the_cut_equals_sorting_everything(seed, threshold):
    blocks = _blocks(seed)
    everything = torch.cat([b.flatten() for b in blocks])
    assert cumulative_cut(lambda: blocks, threshold) == sorted_cut(everything, threshold)


def test_equal_scores_and_no_scores():
    same = [torch.full((4, 4), 0.5)]
    assert cumulative_cut(lambda: same, 0.5) == 0.5
    assert cumulative_cut(lambda: [torch.zeros(3)], 0.5) == math.inf
    assert cumulative_cut(lambda: [], 0.5) == math.inf


def test_only_the_boundary_bin_is_sorted(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.exp(4 * torch.randn(100, 10_000, generator=gen)) for _ in range(3)]
    sorted_sizes = []
    real_sort = torch.sort

    def counting_sort(tensor, *args, **kwargs):
        sorted_sizes.append(tensor.numel())
        return real_sort(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", counting_sort)
    cut = cumulative_cut(lambda: blocks, 0.98)
    monkeypatch.undo()
    assert cut == sorted_cut(torch.cat([b.flatten() for b in blocks]), 0.98)
    assert sum(sorted_sizes) < 3_000_000 / 1000  # 3e6 scores, a few hundred sorted
