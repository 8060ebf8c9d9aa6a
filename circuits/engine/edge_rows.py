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

from bisect import bisect_left
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


class _WidthClass:
    """The positions of one layer whose source count fits one width w, each padded to w (see _PositionGroups)."""

    def __init__(self, positions: torch.Tensor, row: torch.Tensor, slot: torch.Tensor, nodes: torch.Tensor,
                 vectors: torch.Tensor, width: int):
        """``positions`` [k] ascending; source j (of m) sits in row ``row[j]`` (ascending) at ``slot[j]`` < w."""
        self.positions = positions  # [k] long
        self.vectors = torch.zeros(len(positions), width, vectors.shape[1], device=vectors.device)  # [k, w, d]
        self.vectors[row, slot] = vectors
        self.flat = row * width + slot  # [m] each source's place among the [k, w] products, ascending
        self.nodes = nodes  # [m]
        # Python lists, so that cutting at a prefix of positions costs no tensor op and never waits on a device
        self.position_list = positions.tolist()
        self.sources_through = torch.cumsum(torch.bincount(row, minlength=len(positions)), 0).tolist()  # [k]

    def read(self, grad: torch.Tensor, out: torch.Tensor) -> None:
        """Add G[b, p] . vector into ``out`` [B, width] for this class's sources at positions < P'."""
        k = bisect_left(self.position_list, grad.shape[1])  # rows at positions < P'
        if k == 0:
            return
        m = self.sources_through[k - 1]
        here = grad.index_select(1, self.positions[:k]).transpose(0, 1)  # [k, B, d]
        vals = torch.bmm(here, self.vectors[:k].transpose(1, 2))  # [k, B, w]
        vals = vals.permute(1, 0, 2).reshape(len(grad), -1)  # [B, k * w]
        out.index_add_(1, self.nodes[:m], vals.index_select(1, self.flat[:m]))


class _PositionGroups:
    """Sources writing into one layer, grouped by position so that a few batched matmuls read them all.

    A source at position p is read as G[:, p] . vector. Positions are put into width classes by their source
    count (1, 2, 4, 8, ...: the next power of two) and padded only to their class's width, with one bmm per
    class. Stored vectors are therefore under 2x the real ones however skewed the counts are (an encoder that
    fires on hundreds of features at one unusual token widens only that token's class), and so is each read's
    [k, B, w] product. Positions without sources are not stored.
    """

    def __init__(self, nodes: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, n_positions: int):
        """``nodes`` [n] source node ids, ``positions`` [n], ``vectors`` [n, d]: what each source writes."""
        device = vectors.device
        order = torch.argsort(positions, stable=True)
        positions, nodes, vectors = positions[order], nodes[order], vectors[order]
        counts = torch.bincount(positions, minlength=n_positions)  # [P]
        slot = torch.arange(len(positions), device=device) - (torch.cumsum(counts, 0) - counts)[positions]
        widths = _width_class(counts)  # [P], 0 where no source
        local = torch.zeros(n_positions, dtype=torch.long, device=device)  # a position's row within its class
        self.classes: list[_WidthClass] = []
        for width in widths.unique().tolist():
            if width == 0:
                continue
            members = (widths == width).nonzero().flatten()
            local[members] = torch.arange(len(members), device=device)
            take = (widths[positions] == width).nonzero().flatten()
            self.classes.append(_WidthClass(members, local[positions[take]], slot[take], nodes[take],
                                            vectors[take], width))

    def read(self, grad: torch.Tensor, out: torch.Tensor) -> None:
        """Add G[b, p] . vector for every source at positions < P' into ``out`` [B, width]; ``grad`` [B, P', d]."""
        for width_class in self.classes:
            width_class.read(grad, out)


def _width_class(counts: torch.Tensor) -> torch.Tensor:
    """The padded width of a position holding ``counts`` sources: the next power of two (0 for none)."""
    widths = torch.ones_like(counts)
    while bool((widths < counts).any()):
        widths = torch.where(widths < counts, widths * 2, widths)
    return torch.where(counts > 0, widths, 0)


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
             n_rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(n_rows, width, device=self.embeddings.device)

        def read(layer: int, grad: torch.Tensor) -> None:  # sources are read in float32 whatever carried the rows
            self.groups[layer].read(grad.to(out.device, torch.float32), out[: grad.shape[0]])

        grad_emb = self.backward.propagate(top_layer, grad_out, joining.get, read, dtype)
        grad_emb = grad_emb.to(out.device, torch.float32)
        n = grad_emb.shape[1]
        out[:, :n] += torch.einsum("bpd,pd->bp", grad_emb, self.embeddings[:n])  # token nodes come first
        return out

    def source_rows(self, top_layer: int, grad_out: torch.Tensor) -> torch.Tensor:
        """Every source's value [B, n_sources] for gradient rows ``grad_out`` [B, P', d] sitting on the residual
        after ``top_layer`` (-1: on the embeddings): G . (what the source writes), through all frozen routes."""
        width = self.layout.n_sources
        if top_layer < 0:
            out = torch.zeros(len(grad_out), width, device=self.embeddings.device)
            n = grad_out.shape[1]
            out[:, :n] = torch.einsum("bpd,pd->bp", grad_out.to(out.device), self.embeddings[:n])
            return out
        return self._run(top_layer, grad_out, {}, len(grad_out), width, torch.float32)

    def feature_rows(self, feature_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> list[RowBlock]:
        """Rows of active features ``feature_ids`` (any layers), one RowBlock per layer, float32 values.

        All rows share one backward pass: each joins at its own layer, so a mixed batch costs no more than
        its rows' own paths. ``dtype``: what the gradient rows are carried in (bfloat16 rounds them on the way,
        see :mod:`circuits.engine.linear_backward`)."""
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
        values = self._run(top, None, joining, len(feature_ids), self.layout.prefix_end(top), dtype)
        blocks = []
        for layer in layers.unique().tolist():
            ids = (layers == layer).nonzero().flatten()
            blocks.append(RowBlock(feature_ids[ids], values[ids, : self.layout.prefix_end(layer)].clone()))
        return blocks

    def logit_rows(self, directions: torch.Tensor, position: int, row_ids: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> RowBlock:
        """Rows of logit targets: ``directions`` [k, d] in unembedding space (e.g. W_U[tok] - mean W_U)."""
        seeds = torch.zeros(len(directions), position + 1, directions.shape[1], device=directions.device)
        seeds[:, position] = directions * self.backward.s_final[position]
        last = len(self.backward.layers) - 1
        return RowBlock(row_ids, self._run(last, seeds, {}, len(directions), self.layout.n_sources, dtype))
