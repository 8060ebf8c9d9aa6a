"""Numbering of the nodes of one attribution: which index is which token, feature, error or logit.

Nodes are numbered so that every source that can influence a target at layer L comes before every
source that cannot::

    [tokens (P)] [layer 0: features, errors] [layer 1: features, errors] ... [layer n-1: ...] [logits]

A target feature at layer L reads the residual stream before layer L's MLP, so only the prefix
``[0, prefix_end(L))`` of sources can reach it; logits see every source. The adjacency stores each row
as that prefix only. Sources are the nodes ``[0, n_sources)``; targets are the features and logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .replacement import ActiveFeatures

TOKEN, FEATURE, ERROR, LOGIT = 0, 1, 2, 3


@dataclass
class NodeLayout:
    kind: torch.Tensor  # [n_nodes] long: TOKEN, FEATURE, ERROR or LOGIT
    layer: torch.Tensor  # [n_nodes] long: -1 for tokens, n_layers for logits
    position: torch.Tensor  # [n_nodes] long
    feature_node: torch.Tensor  # [n_features] node index of active feature k
    error_node: torch.Tensor  # [n_layers, P] node index of the error at (layer, position), -1 if none
    token_node: torch.Tensor  # [P]
    logit_node: torch.Tensor  # [n_logits]
    layer_end: list[int]  # layer_end[l]: first node index after layer l's block
    n_sources: int

    @property
    def n_nodes(self) -> int:
        return int(self.kind.shape[0])

    def prefix_end(self, target_layer: int) -> int:
        """Number of leading sources that can reach a feature target at ``target_layer``."""
        return self.layer_end[target_layer - 1] if target_layer > 0 else int(self.token_node.shape[0])

    @property
    def target_nodes(self) -> torch.Tensor:
        """Node indices of the targets (rows of the adjacency): features, then logits."""
        return torch.cat([self.feature_node, self.logit_node])


def build_layout(
    features: ActiveFeatures, n_layers: int, error_positions: torch.Tensor, n_logits: int, logit_position: int
) -> NodeLayout:
    """``error_positions`` [P] bool marks positions that have error nodes (the non-constant ones)."""
    P = int(error_positions.shape[0])
    kinds, layers, positions = [torch.full((P,), TOKEN)], [torch.full((P,), -1)], [torch.arange(P)]
    feature_node = torch.empty(len(features), dtype=torch.long)
    error_node = torch.full((n_layers, P), -1, dtype=torch.long)
    layer_end = []
    count = P
    err_pos = error_positions.nonzero().flatten().cpu()
    f_layer = features.layer.cpu()
    f_pos = features.position.cpu()
    for layer in range(n_layers):
        ids = (f_layer == layer).nonzero().flatten()
        feature_node[ids] = torch.arange(count, count + len(ids))
        count += len(ids)
        error_node[layer, err_pos] = torch.arange(count, count + len(err_pos))
        count += len(err_pos)
        kinds += [torch.full((len(ids),), FEATURE), torch.full((len(err_pos),), ERROR)]
        layers += [torch.full((len(ids) + len(err_pos),), layer)]
        positions += [f_pos[ids], err_pos]
        layer_end.append(count)
    n_sources = count
    kinds.append(torch.full((n_logits,), LOGIT))
    layers.append(torch.full((n_logits,), n_layers))
    positions.append(torch.full((n_logits,), logit_position))
    return NodeLayout(
        kind=torch.cat(kinds), layer=torch.cat(layers), position=torch.cat(positions),
        feature_node=feature_node, error_node=error_node, token_node=torch.arange(P),
        logit_node=torch.arange(n_sources, n_sources + n_logits), layer_end=layer_end, n_sources=n_sources,
    )
