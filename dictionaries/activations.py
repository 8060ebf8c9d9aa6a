"""Sparsity nonlinearities of dictionaries: JumpReLU, ReLU, TopK and BatchTopK.

Every activation maps pre-activations ``z`` [..., d_sae] to activations of the same shape.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ActivationConfig


class Activation(nn.Module):
    config: ActivationConfig

    def threshold_tensor(self) -> torch.Tensor | None:
        """The per-feature threshold [d_sae] stored with the weights, or None."""
        return None


class JumpReLU(Activation):
    """``relu(z) * (z > threshold)`` with a per-feature threshold [d_sae] (Gemma Scope's definition)."""

    def __init__(self, threshold: torch.Tensor):
        super().__init__()
        self.config = ActivationConfig(type="jumprelu")
        self.threshold = nn.Parameter(threshold, requires_grad=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z) * (z > self.threshold).to(z.dtype)

    def threshold_tensor(self) -> torch.Tensor:
        return self.threshold


class ReLU(Activation):
    def __init__(self) -> None:
        super().__init__()
        self.config = ActivationConfig(type="relu")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z)


class TopK(Activation):
    """Keeps the k largest pre-activations of each token (after ReLU), zeroes the rest."""

    def __init__(self, k: int):
        super().__init__()
        self.config = ActivationConfig(type="topk", k=k)
        self.k = k

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        values, indices = z.topk(min(self.k, z.shape[-1]), dim=-1)
        return torch.zeros_like(z).scatter(-1, indices, torch.relu(values))


class BatchTopK(Activation):
    """In training, keeps the ``k * n_tokens`` largest pre-activations of the whole batch, so that the mean
    L0 is k while single tokens may use more or fewer features. In eval mode it is a JumpReLU with one
    calibrated threshold shared by all features (the ``threshold`` buffer, a scalar), which is how it is
    saved (see :meth:`to_jumprelu`)."""

    def __init__(self, k: int, threshold: float = 0.0):
        super().__init__()
        self.config = ActivationConfig(type="batchtopk", k=k)
        self.k = k
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.relu(z) * (z > self.threshold).to(z.dtype)
        flat = z.reshape(-1)
        n_tokens = flat.numel() // z.shape[-1]
        values, indices = flat.topk(min(self.k * n_tokens, flat.numel()))
        return torch.zeros_like(flat).scatter(0, indices, torch.relu(values)).reshape(z.shape)

    def to_jumprelu(self, d_sae: int) -> JumpReLU:
        return JumpReLU(self.threshold.detach().expand(d_sae).clone())


def build_activation(config: ActivationConfig, d_sae: int, threshold: torch.Tensor | None = None) -> Activation:
    """The activation module a config describes; ``threshold`` [d_sae] is required for ``jumprelu``."""
    if config.type == "jumprelu":
        if threshold is None:
            threshold = torch.zeros(d_sae)
        return JumpReLU(threshold)
    if config.type == "relu":
        return ReLU()
    if config.type == "topk":
        return TopK(config.k)  # type: ignore[arg-type]
    return BatchTopK(config.k)  # type: ignore[arg-type]
