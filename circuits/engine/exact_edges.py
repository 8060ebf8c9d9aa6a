"""The weights of the edges a pruned graph keeps, exact whatever the rows were stored in.

Rows may be stored rounded (bfloat16, when float32 rows would not fit: see :mod:`circuits.engine.plan`); influence,
pruning and scores then work on the rounded rows, within the bound given in docs/design.md. The edges that survive
pruning are recomputed in float32 here, a batch of target rows at a time, so that a graph's edge weights are the
same as with float32 storage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .edge_rows import RowBlock

Recompute = Callable[[torch.Tensor], list[RowBlock]]  # target row ids [k] -> their rows in float32 (folded)


def kept_edges(
    blocks: list[RowBlock], n_targets: int, recompute: Recompute | None = None, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target rows [E], source nodes [E], weights [E] float32) of every non-zero entry of ``blocks``.

    With ``recompute`` (rows stored rounded), the weights are read from rows recomputed for the kept targets,
    ``batch_size`` targets at a time; without it they are the stored values."""
    targets, sources, weights = [], [], []
    for block in blocks:
        rows, cols = (block.values != 0).nonzero(as_tuple=True)
        targets.append(block.rows[rows].cpu())
        sources.append(cols.cpu())
        weights.append(block.values[rows, cols].float().cpu())
    if not targets:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    target, source, weight = torch.cat(targets), torch.cat(sources), torch.cat(weights)
    if recompute is None:
        return target, source, weight
    # the edges grouped by target once, so that each recomputed block reads only its own rows' edges
    order = torch.argsort(target, stable=True)
    count = torch.bincount(target, minlength=n_targets)  # [n_targets] kept edges of each target row
    first = torch.cumsum(count, 0) - count  # [n_targets] where its edges start in ``order``
    for chunk in target.unique().split(batch_size):
        for block in recompute(chunk):
            rows = block.rows.cpu()
            per_row = count[rows]
            local = torch.repeat_interleave(torch.arange(len(rows)), per_row)  # the block row of each edge
            offset = torch.arange(int(per_row.sum())) - torch.repeat_interleave(torch.cumsum(per_row, 0) - per_row,
                                                                                 per_row)
            edges = order[first[rows][local] + offset]
            weight[edges] = block.values.cpu()[local, source[edges]]
    return target, source, weight
