"""Rows of the attribution adjacency: for a batch of targets, the direct effect of every source on each.

Edge weight A[t, s] is the change of target t when source s's vector is removed from the frozen linear
replacement model: the gradient of t on the residual stream where s is written, dotted with s's vector.
A batch of targets that share a layer is seeded as gradient rows, carried down by
:class:`~circuits.engine.linear_backward.FrozenLinearBackward`, and read at every layer where sources write:

    feature (s, p, i) writing to layer l:  A += G_l[p] . (a * W_dec[s -> l][i])   (summed over l for a CLT)
    error (l, p):                          A  = G_l[p] . e_l[p]
    token p:                               A  = G_emb[p] . embedding[p]

Rows are stored as the prefix of sources that can reach them (see :mod:`circuits.engine.node_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linear_backward import FrozenLinearBackward
from .node_layout import NodeLayout
from .replacement import Replacement


@dataclass
class RowBlock:
    """Adjacency rows ``rows`` (indices into the layout's targets) over source nodes ``[0, width)``."""

    rows: torch.Tensor  # [B] long
    values: torch.Tensor  # [B, width] float32

    @property
    def width(self) -> int:
        return int(self.values.shape[1])


class _PositionGroups:
    """Sources writing into one layer, padded per position so one batched matmul reads them all."""

    def __init__(self, nodes: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, n_positions: int):
        d = vectors.shape[1]
        device = vectors.device
        counts = torch.bincount(positions, minlength=n_positions) if len(positions) else torch.zeros(
            n_positions, dtype=torch.long, device=device)
        width = int(counts.max()) if len(positions) else 0
        order = torch.argsort(positions, stable=True)
        positions, nodes, vectors = positions[order], nodes[order], vectors[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(positions), device=device) - starts[positions]
        self.vectors = torch.zeros(n_positions, width, d, device=device)  # [P, width, d]
        self.vectors[positions, slot] = vectors
        self.nodes = torch.full((n_positions, width), -1, dtype=torch.long, device=device)
        self.nodes[positions, slot] = nodes
        self.counts = counts

    def read(self, grad: torch.Tensor, out: torch.Tensor) -> None:
        """Add G[b, p] . vector for every source at positions < P' into ``out`` [B, width]."""
        n = grad.shape[1]
        if self.vectors.shape[1] == 0:
            return
        width = int(self.counts[:n].max()) if n else 0
        if width == 0:
            return
        vals = torch.bmm(grad.transpose(0, 1), self.vectors[:n, :width].transpose(1, 2))  # [P', B, width]
        nodes = self.nodes[:n, :width]
        valid = nodes >= 0
        out.index_add_(1, nodes[valid], vals.permute(1, 0, 2)[:, valid])


class EdgeRowComputer:
    """Computes adjacency rows for any subset of targets (features by index, logits by seed)."""

    def __init__(
        self,
        backward: FrozenLinearBackward,
        layout: NodeLayout,
        replacement: Replacement,
        embeddings: torch.Tensor,
        encoder_vectors: torch.Tensor,
    ):
        """``encoder_vectors`` [n_features, d]: W_enc[:, i] of each active feature (its target direction)."""
        self.backward = backward
        self.layout = layout
        self.replacement = replacement
        self.embeddings = embeddings
        self.encoder_vectors = encoder_vectors
        n_pos = int(embeddings.shape[0])
        device = embeddings.device
        self.groups = []
        for layer, writes in enumerate(replacement.writes):
            nodes = layout.feature_node.to(device)[writes.feature]
            err_nodes = layout.error_node[layer].to(device)
            has_err = err_nodes >= 0
            err_pos = has_err.nonzero().flatten()
            self.groups.append(_PositionGroups(
                torch.cat([nodes, err_nodes[has_err]]),
                torch.cat([writes.position, err_pos]),
                torch.cat([writes.vectors, replacement.errors[layer][err_pos]]),
                n_pos,
            ))

    def _run(self, top_layer: int, grad_out: torch.Tensor | None, joining: dict[int, torch.Tensor],
             n_rows: int, width: int) -> torch.Tensor:
        out = torch.zeros(n_rows, width, device=self.embeddings.device)

        def read(layer: int, grad: torch.Tensor) -> None:
            self.groups[layer].read(grad.to(out.device), out[: grad.shape[0]])

        grad_emb = self.backward.propagate(top_layer, grad_out, joining.get, read).to(out.device)
        n = grad_emb.shape[1]
        out[:, :n] += torch.einsum("bpd,pd->bp", grad_emb, self.embeddings[:n])  # token nodes come first
        return out

    def feature_rows(self, feature_ids: torch.Tensor) -> list[RowBlock]:
        """Rows of active features ``feature_ids`` (any layers), one RowBlock per layer.

        All rows share one backward pass: each joins at its own layer, so a mixed batch costs no more than
        its rows' own paths."""
        features = self.replacement.features
        layers = features.layer[feature_ids]
        order = torch.argsort(layers * (int(features.position.max()) + 1) + features.position[feature_ids],
                              descending=True)
        feature_ids, layers = feature_ids[order], layers[order]
        positions = features.position[feature_ids]
        n = int(positions.max()) + 1
        d = self.embeddings.shape[1]
        joining: dict[int, torch.Tensor] = {}
        for layer in layers.unique().tolist():
            ids = (layers == layer).nonzero().flatten()
            seeds = torch.zeros(len(ids), n, d, device=self.embeddings.device)
            scale = self.backward.layers[layer].s_pre[positions[ids]]
            seeds[torch.arange(len(ids)), positions[ids]] = self.encoder_vectors[feature_ids[ids]] * scale
            joining[layer] = seeds
        top = int(layers.max())
        values = self._run(top, None, joining, len(feature_ids), self.layout.prefix_end(top))
        blocks = []
        for layer in layers.unique().tolist():
            ids = (layers == layer).nonzero().flatten()
            blocks.append(RowBlock(feature_ids[ids], values[ids, : self.layout.prefix_end(layer)].clone()))
        return blocks

    def logit_rows(self, directions: torch.Tensor, position: int, row_ids: torch.Tensor) -> RowBlock:
        """Rows of logit targets: ``directions`` [k, d] in unembedding space (e.g. W_U[tok] - mean W_U)."""
        seeds = torch.zeros(len(directions), position + 1, directions.shape[1], device=directions.device)
        seeds[:, position] = directions * self.backward.s_final[position]
        last = len(self.backward.layers) - 1
        return RowBlock(row_ids, self._run(last, seeds, {}, len(directions), self.layout.n_sources))
