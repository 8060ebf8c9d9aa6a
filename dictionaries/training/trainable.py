"""The dictionaries being trained: parameters in the normalised space, stacked over layers.

``L`` = layers this process trains, ``N`` tokens, ``D`` = d_model, ``W`` = width. Inputs and targets
are normalised per layer, ``x' = x * in_scale[l]`` and ``y' = y * out_scale[l]`` (scales chosen so
that mean ||x'||^2 = mean ||y'||^2 = D), and the parameters act on them::

    z      = x' @ W_enc[l] + b_enc[l]                                   W_enc [L, D, W], b_enc [L, W]
    y'_hat = a @ W_dec[l] + b_dec[l] (+ x' @ W_skip[l])                 W_dec [L, W, D], W_skip [L, D, D]
    CLT:     y'_hat_t = sum_{s <= t} a_s @ W_dec[s][:, t - s] + b_dec[t] (+ x'_t @ W_skip[t])
                                                                        W_dec[s] [W, L - s, D]

:meth:`TrainableDictionaries.layer_tensors` folds the scales back so the saved dictionaries act on raw
activations: ``W_enc * in_scale``, ``W_dec / out_scale[target]``, ``b_dec / out_scale``,
``W_skip * in_scale / out_scale``; pre-activations, hence thresholds, are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import derive_seed
from .trainer_config import TrainerConfig

INIT_DECODER_NORM = 0.1  # decoder rows start small: the first outputs stay near b_dec
INIT_ENCODER_NORM = 1.0  # encoder columns (= decoder directions): pre-activations start at unit scale


class TrainableDictionaries(nn.Module):
    """Trainable per-layer transcoders (``cross_layer=False``) or a CLT, for model ``layers``."""

    def __init__(self, config: TrainerConfig, layers: list[int], d_model: int):
        super().__init__()
        self.layers, self.d_model, self.width = list(layers), d_model, config.width
        self.cross_layer = config.architecture == "cross-layer"
        L, D, W = len(layers), d_model, config.width
        n_targets = [L - i if self.cross_layer else 1 for i in range(L)]
        decoders, encoders = [], []
        for i, layer in enumerate(layers):  # each layer from its own seed: any sharding starts alike
            gen = torch.Generator().manual_seed(derive_seed("init", config.seed, layer))
            directions = torch.randn(W, n_targets[i], D, generator=gen)
            directions = directions / directions.norm(dim=-1, keepdim=True)
            decoders.append(directions * INIT_DECODER_NORM / math.sqrt(n_targets[i]))
            encoders.append(directions[:, 0, :].T * INIT_ENCODER_NORM)
        self.W_enc = nn.Parameter(torch.stack(encoders).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(L, W))
        self.b_dec = nn.Parameter(torch.zeros(L, D))
        if self.cross_layer:
            self.W_dec = nn.ParameterList([nn.Parameter(d.contiguous()) for d in decoders])
        else:
            self.W_dec_stacked = nn.Parameter(torch.stack([d[:, 0, :] for d in decoders]).contiguous())
        self.W_skip = nn.Parameter(torch.zeros(L, D, D)) if config.has_skip else None
        self.log_threshold = (
            nn.Parameter(torch.full((L, W), math.log(config.jumprelu_init_threshold)))
            if config.activation == "jumprelu" else None
        )
        self.register_buffer("in_scale", torch.ones(L))
        self.register_buffer("out_scale", torch.ones(L))
        self.register_buffer("batch_threshold", torch.zeros(L))  # BatchTopK: running calibrated threshold
        self.register_buffer("tokens_since_fired", torch.zeros(L, W, dtype=torch.long))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # --- computation (normalised space) -------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, N, D] -> z [L, N, W]."""
        return torch.baddbmm(self.b_enc.unsqueeze(1), x, self.W_enc)

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The feature-independent part of the output, b_dec (+ x @ W_skip): [L, N, D]."""
        out = self.b_dec.unsqueeze(1).expand(-1, x.shape[1], -1)
        return out + torch.bmm(x, self.W_skip) if self.W_skip is not None else out

    def decode_dense(self, a: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Features ``lo:hi`` of dense activations a [L, N, W] decoded without bias: [L, N, D]."""
        hi = self.width if hi is None else hi
        if not self.cross_layer:
            return torch.bmm(a[..., lo:hi], self.W_dec_stacked[:, lo:hi])
        N = a.shape[1]
        parts = [
            (a[s, :, lo:hi] @ w[lo:hi].reshape(hi - lo, -1)).reshape(N, -1, self.d_model)
            for s, w in enumerate(self.W_dec)
        ]
        return self._sum_cross_layer(parts)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sparse activations (values, indices) [L, N, k] decoded without bias: [L, N, D] (embedding bags)."""
        L, N, k = values.shape
        if not self.cross_layer:
            offsets = (torch.arange(L, device=indices.device) * self.width).view(L, 1, 1)
            flat = F.embedding_bag(
                (indices + offsets).reshape(L * N, k), self.W_dec_stacked.reshape(L * self.width, self.d_model),
                per_sample_weights=values.reshape(L * N, k), mode="sum",
            )
            return flat.reshape(L, N, self.d_model)
        parts = [
            F.embedding_bag(indices[s], w.reshape(self.width, -1), per_sample_weights=values[s], mode="sum")
            .reshape(N, -1, self.d_model)
            for s, w in enumerate(self.W_dec)
        ]
        return self._sum_cross_layer(parts)

    def _sum_cross_layer(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """parts[s] [N, L - s, D] (source s to targets s..L-1) -> [L, N, D] summed per target."""
        return torch.stack([sum(parts[s][:, t - s] for s in range(t + 1)) for t in range(self.n_layers)])

    def thresholds(self) -> torch.Tensor:
        """JumpReLU thresholds theta [L, W] (exp of the trained log-thresholds)."""
        return self.log_threshold.exp()

    # --- saving --------------------------------------------------------------------------------------
    def layer_tensors(self, i: int, activation: str) -> dict[str, torch.Tensor]:
        """Layer ``i``'s native tensors in the raw (unnormalised) space; ``activation`` is the trained one."""
        with torch.no_grad():
            s_in, s_out = self.in_scale[i], self.out_scale
            if self.cross_layer:
                w_dec = self.W_dec[i] / s_out[i:].view(1, -1, 1)
            else:
                w_dec = self.W_dec_stacked[i] / s_out[i]
            tensors = {
                "W_enc": self.W_enc[i] * s_in, "b_enc": self.b_enc[i].clone(),
                "W_dec": w_dec, "b_dec": self.b_dec[i] / s_out[i],
            }
            if activation == "jumprelu":
                tensors["threshold"] = self.thresholds()[i].clone()
            elif activation == "batchtopk":
                tensors["threshold"] = self.batch_threshold[i].clamp_min(0).expand(self.width).clone()
            if self.W_skip is not None:
                tensors["W_skip"] = self.W_skip[i] * s_in / s_out[i]
            return {name: t.detach().contiguous() for name, t in tensors.items()}
