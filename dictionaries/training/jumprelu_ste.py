"""JumpReLU and its L0 with straight-through estimators for the threshold (Rajamanoharan et al., 2024).

Forward passes are exact: ``jumprelu(z, theta) = z * H(z - theta)`` (equal to the native
``relu(z) * (z > theta)`` for theta > 0) and ``step(z, theta) = H(z - theta)``. The threshold has no
true gradient, so the backward passes use a rectangle kernel ``K(u) = 1[|u| < 1/2]`` of width
``bandwidth`` (epsilon)::

    d jumprelu / d z     = H(z - theta)                         (as the plain function)
    d jumprelu / d theta = -(theta / eps) * K((z - theta) / eps)
    d step / d z         = 0
    d step / d theta     = -(1 / eps) * K((z - theta) / eps)

Shapes: ``z`` [..., d_sae], ``theta`` broadcastable to it (e.g. [L, 1, d_sae] for [L, N, d_sae]).
"""

from __future__ import annotations

import torch


def _kernel(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return ((z - theta).abs() < bandwidth / 2).to(z.dtype) / bandwidth


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` over the dimensions that were broadcast to reach its shape from ``shape``."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim, keepdim=True)
    return grad


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = -theta * _kernel(z, theta, ctx.bandwidth) * grad  # -(theta / eps) K((z - theta) / eps)
        return grad_z, _reduce_to(grad_theta, theta.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = -_kernel(z, theta, ctx.bandwidth) * grad
        return None, _reduce_to(grad_theta, theta.shape), None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``z * H(z - theta)`` with the straight-through threshold gradient above."""
    return _JumpReLU.apply(z, theta, bandwidth)


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``H(z - theta)`` (1.0 where a feature fires) with the straight-through threshold gradient above."""
    return _Step.apply(z, theta, bandwidth)
