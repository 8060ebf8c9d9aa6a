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
3. Features left without a path to the logits (no kept outgoing edge) are dropped, repeatedly.
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


def fold_remainders(blocks: list[RowBlock], layout: NodeLayout, features_layer: torch.Tensor,
                    features_position: torch.Tensor, expanded: torch.Tensor) -> list[RemainderGroup]:
    """Fold unexpanded features into one node per (layer, position), in place on ``blocks``."""
    pending = (~expanded).nonzero().flatten().cpu()
    if len(pending) == 0:
        return []
    groups = []
    keys = (features_layer.cpu()[pending] * (int(features_position.max()) + 1) + features_position.cpu()[pending])
    for key in keys.unique():
        members = pending[keys == key]
        nodes = layout.feature_node[members]
        groups.append(RemainderGroup(int(nodes[0]), int(features_layer[members[0]]),
                                     int(features_position[members[0]]), members))
        for block in blocks:
            inside = nodes[nodes < block.width].to(block.values.device)
            if len(inside) > 1:
                block.values[:, inside[0]] = block.values[:, inside].float().sum(1).to(block.values.dtype)
                block.values[:, inside[1:]] = 0.0
    return groups


def remainder_influence(influence: torch.Tensor, layout: NodeLayout, groups: list[RemainderGroup]) -> torch.Tensor:
    """Node influence (computed BEFORE folding) with each remainder node carrying the summed influence of
    its members. Folding sums the members' signed edges, which is the right edge weight (removing all
    members moves each target by exactly that much) but would let members whose edges cancel lose
    influence; ranking remainders by their members' total keeps every member's share."""
    influence = influence.clone()
    for group in groups:
        members = layout.feature_node[group.features].to(influence.device)
        total = influence[members].sum()
        influence[members] = 0.0
        influence[group.node] = total
    return influence


@dataclass
class PrunedGraph:
    blocks: list[RowBlock]  # kept rows only, pruned columns and edges zeroed
    node_mask: torch.Tensor  # [n_nodes] bool
    influence: torch.Tensor  # [n_nodes] influence in the unpruned graph


def prune(blocks: list[RowBlock], layout: NodeLayout, weights: torch.Tensor, node_threshold: float,
          edge_threshold: float, folded_away: torch.Tensor, influence: torch.Tensor | None = None) -> PrunedGraph:
    """Prune (see the module docstring). ``folded_away`` [n_nodes] bool marks nodes merged into remainders.

    ``influence`` [n_nodes] overrides the node influence used to choose nodes (see
    :func:`remainder_influence`); by default it is computed from ``blocks``."""
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

    def restrict(source_blocks):
        kept = []
        for block in source_blocks:
            rows = keep[targets[block.rows]]
            if rows.any():
                kept.append(RowBlock(block.rows[rows], block.values[rows] * keep[: block.width]))
        return kept

    pruned = restrict(blocks)
    pruned_influence = node_influence(pruned, layout, weights)
    own = torch.zeros(layout.n_nodes, device=device)
    own[layout.logit_node.to(device)] = weights
    def scores():  # each edge's score, one block at a time (never all of them at once)
        for block in pruned:
            magnitude = block.values.abs().float()  # rows may be stored in bfloat16
            coefficient = (own + pruned_influence)[targets[block.rows]] / magnitude.sum(1).clamp_min(1e-30)
            yield magnitude * coefficient[:, None]

    edge_cut = cumulative_cut(scores, edge_threshold)
    for block, score in zip(pruned, scores(), strict=True):
        block.values[score < edge_cut] = 0.0

    while True:  # drop features that no longer reach the logits
        has_out = torch.zeros(layout.n_nodes, dtype=torch.bool, device=device)
        for block in pruned:
            has_out[: block.width] |= (block.values != 0).any(0)
        dead = keep & (kind == FEATURE) & ~has_out
        if not dead.any():
            break
        keep &= ~dead
        pruned = restrict(pruned)
    return PrunedGraph(pruned, keep, influence)
