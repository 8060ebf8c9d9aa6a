"""Training losses and the one definition of FVU used by training, evaluation and benchmarks.

FVU (fraction of variance unexplained) of a reconstruction y_hat of targets y over a set of tokens::

    FVU = sum_n ||y_n - y_hat_n||^2 / sum_n ||y_n - mean_m(y_m)||^2

with the mean taken over the same tokens. 0 is perfect; 1 is no better than the mean. Over several
layers the "total" FVU pools the sums: sum over layers of the numerators / sum of the denominators.
Computed from running sums (float64) so that batches, ranks and layers can be added up exactly.

Loss terms (``n`` = tokens in the global batch, summed over every rank; ``D`` = d_model) are written
as sums over this rank's tokens divided by global quantities, so that summing gradients over
data-parallel ranks gives exactly the one-process gradient:

- reconstruction: mean over matryoshka prefixes p of  sum_layers sum_tokens ||y - y_hat_p||^2 / (n D);
- AuxK (Gao et al., 2024): sum_layers sum_tokens ||e - e_hat||^2 / sum_tokens ||e||^2, with e = y - y_hat
  (detached) the residual and e_hat its reconstruction from the top ``aux_k`` dead features;
- L0: ``coef * L0`` (plain) or ``coef * |L0 / target - 1|`` (target-L0), L0 = mean active features
  per token, summed over layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .distributed import DistributedContext


def fvu_from_sums(sse: torch.Tensor, sum_y: torch.Tensor, sum_y2: torch.Tensor, n: float) -> torch.Tensor:
    """FVU from sum ||y - y_hat||^2 [...], sum y [..., D], sum ||y||^2 [...] over n tokens (see module doc)."""
    variance_sum = sum_y2 - sum_y.pow(2).sum(-1) / n
    return sse / variance_sum.clamp_min(torch.finfo(variance_sum.dtype).tiny)


@dataclass
class FvuSums:
    """Running sums for FVU per layer. sse, sum_y2 [L]; sum_y [L, D]; n tokens (per layer)."""

    sse: torch.Tensor
    sum_y: torch.Tensor
    sum_y2: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, n_layers: int, d_model: int) -> FvuSums:
        z = torch.zeros(n_layers, dtype=torch.float64)
        return cls(z.clone(), torch.zeros(n_layers, d_model, dtype=torch.float64), z.clone(), 0)

    def add(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        """y, y_hat [L, N, D] (detached)."""
        y, y_hat = y.detach().double(), y_hat.detach().double()
        self.sse += (y - y_hat).pow(2).sum((-1, -2))
        self.sum_y += y.sum(-2)
        self.sum_y2 += y.pow(2).sum((-1, -2))
        self.n += y.shape[-2]

    def per_layer(self) -> torch.Tensor:
        return fvu_from_sums(self.sse, self.sum_y, self.sum_y2, self.n)

    def total(self) -> float:
        """Pooled over layers: sum of numerators / sum of denominators."""
        variance = self.sum_y2 - self.sum_y.pow(2).sum(-1) / self.n
        return float(self.sse.sum() / variance.sum())


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """FVU of y_hat [N, D] against y [N, D] (see the module docstring)."""
    sums = FvuSums.zeros(1, y.shape[-1])
    sums.add(y.reshape(1, -1, y.shape[-1]), y_hat.reshape(1, -1, y.shape[-1]))
    return float(sums.per_layer()[0])


def reconstruction_loss(y: torch.Tensor, prefix_outputs: Sequence[torch.Tensor], n_global: int) -> torch.Tensor:
    """Mean over prefixes of sum_layers sum_tokens ||y - y_hat_p||^2 / (n_global D); y, y_hat_p [L, N, D]."""
    total = sum((y - y_hat).pow(2).sum() for y_hat in prefix_outputs)
    return total / (len(prefix_outputs) * n_global * y.shape[-1])


def auxk_loss(residual: torch.Tensor, aux_reconstruction: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """sum_layers sum_tokens ||e - e_hat||^2 / sum_tokens ||e||^2 (global denominator); e, e_hat [L, N, D]."""
    denominator = ctx.sum_over_data(residual.detach().pow(2).sum((-1, -2)).clone())
    numerator = (residual.detach() - aux_reconstruction).pow(2).sum((-1, -2))
    return (numerator / denominator.clamp_min(1e-12)).sum()


def l0_penalty(
    local_l0: torch.Tensor, global_l0: torch.Tensor, coefficient: float, target: float | None
) -> tuple[torch.Tensor, float]:
    """(loss term for backward, its value). ``local_l0`` [L] = this rank's differentiable share of the
    mean L0 per layer (its tokens' counts / n_global); ``global_l0`` [L] the detached global mean."""
    if target is None:
        return coefficient * local_l0.sum(), coefficient * float(global_l0.sum())
    sign = torch.sign(global_l0 - target)
    return (coefficient * sign * local_l0 / target).sum(), coefficient * float((global_l0 / target - 1).abs().sum())
