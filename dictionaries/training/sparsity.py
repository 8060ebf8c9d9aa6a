"""Sparse feature codes of a batch during training: TopK, BatchTopK and JumpReLU, plus AuxK's dead code.

Shapes: z [L, N, W] pre-activations, x [L, N, D]. TopK never builds a dense activation tensor: its
encoder returns (values, indices) [L, N, k] and its backward pass computes the encoder gradients with
one sparse matrix product, so a step costs about one dense encoder pass instead of three dense
encoder/decoder passes and their gradients. BatchTopK and JumpReLU work on dense activations.

- TopK: the k largest pre-activations of each token, after ReLU (the native ``topk``).
- BatchTopK: over the global batch of n tokens (all data-parallel ranks), the k * n largest
  pre-activations of each layer; the threshold that selects them is tracked (running average) and
  saved as a JumpReLU threshold.
- JumpReLU: ``z * H(z - theta)`` with straight-through threshold gradients (:mod:`.jumprelu_ste`).
- AuxK: the ``aux_k`` largest pre-activations among dead features, as (values, indices) [L, N, aux_k].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import DistributedContext
from .jumprelu_ste import jumprelu, step
from .trainable import TrainableDictionaries
from .trainer_config import TrainerConfig


@dataclass
class FeatureCode:
    """One batch's features: ``dense`` [L, N, W], or ``values``/``indices`` [L, N, k] (TopK)."""

    dense: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    aux_values: torch.Tensor | None = None
    aux_indices: torch.Tensor | None = None
    local_l0: torch.Tensor | None = None  # JumpReLU: [L] differentiable (this rank's counts / n_global)
    threshold: torch.Tensor | None = None  # BatchTopK: [L] the batch's selection threshold

    def decode(self, model: TrainableDictionaries, lo: int, hi: int) -> torch.Tensor:
        """Features lo:hi decoded without bias: [L, N, D]."""
        if self.dense is not None:
            return model.decode_dense(self.dense, lo, hi)
        values = self.values
        if lo > 0 or hi < model.width:
            values = values * ((self.indices >= lo) & (self.indices < hi)).to(values.dtype)
        return model.decode_sparse(values, self.indices)

    @torch.no_grad()
    def active_counts(self) -> torch.Tensor:
        """Active features summed over tokens, per layer: [L] float64."""
        active = self.dense if self.dense is not None else self.values
        return (active > 0).sum((-1, -2)).double()

    @torch.no_grad()
    def fired(self, width: int) -> torch.Tensor:
        """Which features fired on some token of the batch: [L, W] bool."""
        if self.dense is not None:
            return (self.dense > 0).any(1)
        hits = torch.zeros(self.values.shape[0], width)
        hits.scatter_add_(1, self.indices.flatten(1), (self.values > 0).flatten(1).float())
        return hits > 0


class _SparseTopKEncode(torch.autograd.Function):
    """(x, W_enc, b_enc) -> top-k (values, indices) per token, and AuxK's top among dead features."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dead, aux_k):
        z = torch.baddbmm(b_enc.unsqueeze(1), x, W_enc)  # not kept: AuxK masks it in place below
        values, indices = z.topk(k, dim=-1)
        values = values.relu()
        aux_values = aux_indices = None
        if dead is not None:
            aux_values, aux_indices = z.masked_fill_(~dead.unsqueeze(1), float("-inf")).topk(aux_k, dim=-1)
            aux_values = aux_values.relu()
        ctx.save_for_backward(x, indices, values, aux_indices, aux_values)
        ctx.width = W_enc.shape[-1]
        ctx.mark_non_differentiable(indices)
        if aux_indices is not None:
            ctx.mark_non_differentiable(aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux_values, _grad_aux_indices):
        x, indices, values, aux_indices, aux_values = ctx.saved_tensors
        L, N, D = x.shape
        features, grads = [indices], [grad_values * (values > 0)]
        if aux_indices is not None and grad_aux_values is not None:
            features.append(aux_indices)
            grads.append(grad_aux_values * (aux_values > 0))
        feature = torch.cat(features, -1)  # [L, N, k (+ aux_k)]
        grad = torch.cat(grads, -1)
        # dz is sparse: build it as one block-diagonal [L * W, L * N] matrix and multiply by x once.
        layer = torch.arange(L).view(L, 1, 1)
        rows = (feature + layer * ctx.width).reshape(-1)
        cols = (torch.arange(N).view(1, N, 1) + layer * N).expand_as(feature).reshape(-1)
        dz_t = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), grad.reshape(-1), (L * ctx.width, L * N), check_invariants=False
        )
        grad_w = torch.sparse.mm(dz_t, x.reshape(L * N, D)).view(L, ctx.width, D).transpose(1, 2)
        grad_b = torch.zeros(L * ctx.width, dtype=grad.dtype).index_add_(0, rows, grad.reshape(-1)).view(L, -1)
        return None, grad_w, grad_b, None, None, None


def encode(model: TrainableDictionaries, x: torch.Tensor, config: TrainerConfig, ctx: DistributedContext,
           dead: torch.Tensor | None, aux_k: int, n_global: int) -> FeatureCode:
    """The features of x [L, N, D]; ``dead`` [L, W] marks dead features for AuxK (None: no AuxK)."""
    if config.activation == "topk":
        values, indices, aux_values, aux_indices = _SparseTopKEncode.apply(
            x, model.W_enc, model.b_enc, config.k, dead, aux_k)
        return FeatureCode(values=values, indices=indices, aux_values=aux_values, aux_indices=aux_indices)
    z = model.pre_activations(x)
    code = FeatureCode()
    if config.activation == "batchtopk":
        code.threshold = batch_threshold(z, config.k * n_global, ctx)
        code.dense = torch.where(z >= code.threshold.view(-1, 1, 1), z.relu(), torch.zeros((), dtype=z.dtype))
    else:
        theta = model.thresholds().unsqueeze(1)
        code.dense = jumprelu(z, theta, config.jumprelu_bandwidth)
        code.local_l0 = step(z, theta, config.jumprelu_bandwidth).sum((-1, -2)) / n_global
    if dead is not None:
        code.aux_values, code.aux_indices = z.masked_fill(~dead.unsqueeze(1), float("-inf")).topk(aux_k, dim=-1)
        code.aux_values = code.aux_values.relu()
    return code


@torch.no_grad()
def batch_threshold(z: torch.Tensor, keep: int, ctx: DistributedContext) -> torch.Tensor:
    """Per layer, the ``keep``-th largest pre-activation of the global batch: [L]."""
    flat = z.detach().reshape(z.shape[0], -1)
    if not ctx.data_parallel:
        keep = min(keep, flat.shape[1])
        return flat.kthvalue(flat.shape[1] - keep + 1, dim=1).values
    local_top = flat.topk(min(keep, flat.shape[1]), dim=1).values
    everyone = ctx.gather_over_data(local_top, dim=1)
    keep = min(keep, everyone.shape[1])
    return everyone.kthvalue(everyone.shape[1] - keep + 1, dim=1).values
