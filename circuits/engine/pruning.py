"""Remainder folding and pruning of an attribution's adjacency.

Remainders: with a feature budget, features that were not expanded have outgoing edges but no rows.
So that their influence is never dropped silently, the unexpanded features of each (layer, position)
are folded into one remainder node: their columns are summed into the column of the first of them,
which stands for the group.

Pruning keeps what matters for the logits:
1. Nodes: tokens, errors and logits always stay. Features (and remainders) are sorted by influence on
   the logits (:func:`circuits.engine.influence.node_influence`); the smallest set whose cumulative influence
   reaches ``node_threshold`` of all feature influence is kept.
2. Edges: on the node-pruned graph, edge (t, s) scores Â[t, s] * (w[t] + influence[t]) (its share of the
   normalised input of t times how much t matters). The highest-scoring edges whose cumulative score
   reaches ``edge_threshold`` of the total are kept.
3. Features left without a path to the logits (no kept outgoing edge) are dropped, repeatedly (one sweep from
   the top layer down finds the fixed point).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cumulative_cut import cumulative_cut
from .edge_rows import RowBlock
from .influence import node_influence
from .node_layout import FEATURE, NodeLayout


@dataclass
class RemainderGroup:
    node: int  # the node that stands for the group
    layer: int
    position: int
    features: torch.Tensor  # active-feature ids folded into it


_FOLD_CHUNK = 1 << 24  # most elements of one block's folded columns gathered (in float32) at once


class Remainders:
    """The remainder groups of an attribution, and the folding of any rows into them.

    Built once from the unexpanded features (one sort, no loop over groups); :meth:`fold` then folds a list of
    blocks with a fixed number of tensor operations per block, whatever the number of groups. The column map of
    each row width (which columns add into which representative, which are zeroed) is computed once and reused.
    """

    def __init__(self, layout: NodeLayout, features_layer: torch.Tensor, features_position: torch.Tensor,
                 expanded: torch.Tensor):
        pending = (~expanded).nonzero().flatten().cpu()
        layer, position = features_layer.cpu()[pending], features_position.cpu()[pending]
        keys = layer * (int(features_position.max()) + 1) + position if len(pending) else pending
        # groups in increasing (layer, position); members of a group in increasing feature id
        _, group_of, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        order = torch.argsort(group_of, stable=True)
        self.members = pending[order]  # [n_pending] active-feature ids, grouped
        self.group_of = group_of[order]  # [n_pending] the group of each
        self.nodes = layout.feature_node[self.members]  # [n_pending] the node of each
        first = torch.cumsum(counts, 0) - counts  # [n_groups] each group's first member
        self.groups = [
            RemainderGroup(node, group_layer, group_position, features) for node, group_layer, group_position, features
            in zip(self.nodes[first].tolist(), layer[order][first].tolist(), position[order][first].tolist(),
                   self.members.split(counts.tolist()), strict=True)
        ]
        self._maps: dict[tuple[int, torch.device, int], tuple[torch.Tensor, ...]] = {}  # see _column_map

    def folded_away(self, n_nodes: int) -> torch.Tensor:
        """[n_nodes] bool: the nodes merged into a remainder (every member but the one that stands for it)."""
        away = torch.zeros(n_nodes, dtype=torch.bool)
        away[self.nodes] = True
        away[torch.tensor([group.node for group in self.groups], dtype=torch.long)] = False
        return away

    def _column_map(self, width: int, values: torch.Tensor):
        """For rows ``values`` over sources [0, width): (columns [k] int32 read, grouped by representative; lengths
        [r] of the groups; representatives [r]; a bit mask [width] of the values' element size, zero in the
        columns to clear). A group's representative is its first member inside the row; groups with fewer than two
        members inside are left alone (as the loop over groups did)."""
        key = (width, values.device, values.element_size())
        if key not in self._maps:
            n_groups = len(self.groups)
            inside = (self.nodes < width).nonzero().flatten()
            group = self.group_of[inside]
            count = torch.bincount(group, minlength=n_groups)
            first = torch.full((n_groups,), len(self.nodes), dtype=torch.long).scatter_reduce_(
                0, group, inside, "amin")
            folding = (count > 1).nonzero().flatten()  # [r] groups folded in these rows
            columns = self.nodes[inside[count[group] > 1]]  # grouped, as the members are
            representatives = self.nodes[first[folding]]
            bits = _BITS[values.element_size()]
            mask = torch.full((width,), -1, dtype=bits).index_fill_(0, columns, 0).index_fill_(0, representatives, -1)
            self._maps[key] = (columns.int().to(values.device), count[folding].to(values.device),
                               representatives.to(values.device), mask.to(values.device))
        return self._maps[key]

    def fold(self, blocks: list[RowBlock]) -> None:
        """Fold the unexpanded features' columns of ``blocks`` into their remainders, in place: each
        representative's column becomes the float32 sum of its members' columns, the others become zero."""
        for block in blocks:
            columns, lengths, representatives, mask = self._column_map(block.width, block.values)
            if len(representatives) == 0:
                continue
            for part in block.values.split(max(1, _FOLD_CHUNK // len(columns))):  # views: written in place
                summed = torch.segment_reduce(part.float().index_select(1, columns), "sum",
                                              lengths=lengths.expand(len(part), -1).contiguous(), axis=1)
                part.index_copy_(1, representatives, summed.to(part.dtype))
            # the other members' columns to exactly +0.0 (as assignment writes), in one vectorised pass:
            # index_fill_ and masked_fill_ are ~20x slower on CPU
            block.values.view(mask.dtype).bitwise_and_(mask)


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer type of each element size


def fold_remainders(blocks: list[RowBlock], layout: NodeLayout, features_layer: torch.Tensor,
                    features_position: torch.Tensor, expanded: torch.Tensor) -> list[RemainderGroup]:
    """Fold unexpanded features into one node per (layer, position), in place on ``blocks``; the groups in
    increasing (layer, position). See :class:`Remainders` to fold further rows the same way."""
    remainders = Remainders(layout, features_layer, features_position, expanded)
    remainders.fold(blocks)
    return remainders.groups


def remainder_influence(influence: torch.Tensor, layout: NodeLayout, groups: list[RemainderGroup]) -> torch.Tensor:
    """Node influence (computed BEFORE folding) with each remainder node carrying the summed influence of
    its members. Folding sums the members' signed edges, which is the right edge weight (removing all
    members moves each target by exactly that much) but would let members whose edges cancel lose
    influence; ranking remainders by their members' total keeps every member's share."""
    influence = influence.clone()
    if not groups:
        return influence
    device = influence.device
    members = layout.feature_node[torch.cat([group.features.cpu() for group in groups])].to(device)
    sizes = torch.tensor([len(group.features) for group in groups], device=device)
    group_of = torch.repeat_interleave(torch.arange(len(groups), device=device), sizes)
    total = torch.zeros(len(groups), dtype=influence.dtype, device=device).index_add_(0, group_of, influence[members])
    influence[members] = 0.0
    influence[torch.tensor([group.node for group in groups], device=device)] = total
    return influence


def _reaching_logits(blocks: list[RowBlock], keep: torch.Tensor, is_feature: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """``keep`` [n_nodes] bool less the features without a path of non-zero edges through kept nodes to the logits.

    Dropping such a feature can leave the features below it without one, so the answer is the fixed point of
    repeated dropping; the graph is layered (a row's target is never inside its own source prefix), so one sweep
    from the widest rows down finds it: a target's outgoing edges are all in wider rows, already swept."""
    has_out = torch.zeros_like(keep)
    for block in sorted(blocks, key=lambda block: -block.width):
        nodes = targets[block.rows]
        alive = keep[nodes] & (has_out[nodes] | ~is_feature[nodes])  # [B]
        has_out[: block.width] |= ((block.values != 0) & alive[:, None]).any(0)
    return keep & (has_out | ~is_feature)


@dataclass
class PrunedGraph:
    blocks: list[RowBlock]  # kept rows only, pruned columns and edges zeroed
    node_mask: torch.Tensor  # [n_nodes] bool
    influence: torch.Tensor  # [n_nodes] influence in the unpruned graph


def prune(blocks: list[RowBlock], layout: NodeLayout, weights: torch.Tensor, node_threshold: float,
          edge_threshold: float, folded_away: torch.Tensor, influence: torch.Tensor | None = None,
          consume: bool = False) -> PrunedGraph:
    """Prune (see the module docstring). ``folded_away`` [n_nodes] bool marks nodes merged into remainders.

    ``influence`` [n_nodes] overrides the node influence used to choose nodes (see
    :func:`remainder_influence`); by default it is computed from ``blocks``. ``consume``: ``blocks`` is emptied as
    its rows are copied into the pruned graph, so each block is freed once its kept rows are copied (the memory
    peak is the rows plus one block, not the rows plus all their kept copies)."""
    device = weights.device
    if influence is None:
        influence = node_influence(blocks, layout, weights)
    influence = influence.to(device)
    kind = layout.kind.to(device)
    is_feature = (kind == FEATURE) & ~folded_away.to(device)
    cut = cumulative_cut(lambda: [influence[is_feature]], node_threshold)
    if cut == float("inf") and node_threshold < 1.0:  # no feature has influence: none is preferred, all stay
        cut = 0.0
    keep = ~is_feature | (influence >= cut)
    keep &= ~folded_away.to(device)
    targets = layout.target_nodes.to(device)

    def restrict(source_blocks: list[RowBlock], consume: bool) -> list[RowBlock]:
        kept = []
        for i, block in enumerate(source_blocks):
            if consume:
                source_blocks[i] = None  # type: ignore[call-overload]  # the list no longer holds the block
            rows = keep[targets[block.rows]]
            if rows.any():
                kept.append(RowBlock(block.rows[rows], block.values[rows] * keep[: block.width]))
            del block
        if consume:
            source_blocks.clear()
        return kept

    pruned = restrict(blocks, consume)
    pruned_influence = node_influence(pruned, layout, weights)
    own = torch.zeros(layout.n_nodes, device=device)
    own[layout.logit_node.to(device)] = weights
    output_weight = own + pruned_influence  # [n_nodes] (once: not one n_nodes pass per block)

    def scores():  # each edge's score, one block at a time (never all of them at once)
        for block in pruned:
            magnitude = block.values.abs().float()  # rows may be stored in bfloat16
            coefficient = output_weight[targets[block.rows]] / magnitude.sum(1).clamp_min(1e-30)
            yield magnitude * coefficient[:, None]

    edge_cut = cumulative_cut(scores, edge_threshold)
    for block, score in zip(pruned, scores(), strict=True):
        block.values[score < edge_cut] = 0.0

    reaching = _reaching_logits(pruned, keep, kind == FEATURE, targets)
    if not torch.equal(reaching, keep):
        keep = reaching
        pruned = restrict(pruned, True)
    return PrunedGraph(pruned, keep, influence)
