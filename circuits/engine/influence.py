"""Influence of every node on the logit targets, and the graph's replacement and completeness scores.

Let Â be the adjacency with each target row normalised to |A[t, :]| / sum_s |A[t, s]|, and w the logit
weights (token probabilities) placed on the logit nodes. A node's influence is the total weight of all
paths from it to the logits,

    influence = w Â + w Â^2 + w Â^3 + ...

The graph is layered (sources of a row always sit below its target), so one sweep over the rows from
the top layer down computes the whole series exactly: influence[s] = sum_t Â[t, s] (w[t] + influence[t]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .edge_rows import RowBlock
from .node_layout import ERROR, TOKEN, NodeLayout


def _sweep_order(blocks: Sequence[RowBlock]) -> list[RowBlock]:
    """Blocks with wider rows (higher layers, logits) first: every row's influence is final when it is used."""
    return sorted(blocks, key=lambda block: -block.width)


def node_influence(blocks: Sequence[RowBlock], layout: NodeLayout, weights: torch.Tensor) -> torch.Tensor:
    """Influence [n_nodes] of every node on the logits; ``weights`` [n_logits] are the logit weights.

    Rows not in ``blocks`` (features not yet expanded) are treated as having no inputs.
    """
    targets = layout.target_nodes.to(weights.device)
    influence = torch.zeros(layout.n_nodes, device=weights.device)
    own_weight = torch.zeros(layout.n_nodes, device=weights.device)
    own_weight[layout.logit_node.to(weights.device)] = weights
    for block in _sweep_order(blocks):
        nodes = targets[block.rows]
        magnitude = block.values.abs().float()  # rows may be stored in bfloat16
        total = magnitude.sum(1).clamp_min(1e-30)
        coefficient = (own_weight[nodes] + influence[nodes]) / total
        influence[: block.width] += coefficient @ magnitude
    return influence


@dataclass
class GraphScores:
    """``replacement``: the fraction of the end-to-end influence on the logits that starts at token nodes
    rather than error nodes, token_influence / (token_influence + error_influence); 1 means every path
    from the logits back to the input runs through features (and attention), none ends in an error.

    ``completeness``: the fraction of each node's normalised input that comes from non-error nodes,
    averaged over nodes weighted by their influence plus logit weight; 1 means no node takes any direct
    input from an error node."""

    replacement: float
    completeness: float


def graph_scores(blocks: Sequence[RowBlock], layout: NodeLayout, weights: torch.Tensor,
                 influence: torch.Tensor | None = None) -> GraphScores:
    """Scores of the graph ``blocks`` describe; ``influence`` may pass in its node influence if already known."""
    if influence is None:
        influence = node_influence(blocks, layout, weights)
    kind = layout.kind.to(weights.device)
    token_influence = influence[kind == TOKEN].sum()
    error_influence = influence[kind == ERROR].sum()
    replacement = token_influence / (token_influence + error_influence).clamp_min(1e-30)

    targets = layout.target_nodes.to(weights.device)
    output_weight = influence.clone()
    output_weight[layout.logit_node.to(weights.device)] += weights
    is_error = kind[: layout.n_sources] == ERROR
    numerator = torch.zeros((), device=weights.device)
    denominator = torch.zeros((), device=weights.device)
    for block in blocks:
        magnitude = block.values.abs().float()  # rows may be stored in bfloat16
        total = magnitude.sum(1).clamp_min(1e-30)
        error_fraction = magnitude[:, is_error[: block.width]].sum(1) / total
        node_weight = output_weight[targets[block.rows]]
        numerator += ((1 - error_fraction) * node_weight).sum()
        denominator += node_weight.sum()
    completeness = numerator / denominator.clamp_min(1e-30)
    return GraphScores(float(replacement), float(completeness))
