"""Vector-Jacobian products of the frozen replacement model, written out by hand.

With attention patterns and norm scales frozen and the MLPs replaced, the model is linear in its
sources, and its transpose is the map below, applied to a batch of B gradient rows G [B, P', d] on the
residual stream (P' = the positions up to the latest target in the batch; later positions cannot
influence earlier ones). Going down through layer l, from the residual after layer l (``out``):

    skip:       G_mid = G_out + ((G_out @ W_skip^T) * s_pre)      s_pre[p] = r_pre[p] * (1 + w_pre), 0 at constant positions
    attention:  G_in  = G_mid + ((Pattern^T (G_mid * s_post) W_O) W_V) * s_in     per head, GQA groups summed

where s_* are the frozen RMSNorm scales. The MLP itself contributes nothing: its output is a sum of
sources (features, errors) and constants. Nothing above the targets' layer is ever touched, and no
full-vocabulary logits are computed. Everything runs in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dictionaries.dictionary_set import DictionarySet
from dictionaries.model_loading import LoadedModel

from .clean_run import CleanRun


@dataclass
class _LayerWeights:
    W_O: torch.Tensor  # [d, H * hd]   (o_proj.weight)
    W_V: torch.Tensor  # [n_kv * hd, d] (v_proj.weight)
    pattern_T: torch.Tensor  # [H, P, P] pattern transposed: [h, key, query]
    s_in: torch.Tensor  # [P, d]
    s_post: torch.Tensor  # [P, d]
    s_pre: torch.Tensor  # [P, d], zero at constant positions
    W_skip_T: torch.Tensor | None  # [d, d]


class FrozenLinearBackward:
    """Propagates gradient rows down the frozen model; see the module docstring for the math."""

    def __init__(self, lm: LoadedModel, clean: CleanRun, dicts: DictionarySet, constant_positions: torch.Tensor,
                 device: torch.device):
        self.device = device
        config = lm.config
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(config.num_key_value_heads)
        self.head_dim = int(config.head_dim)
        live = (~constant_positions.to(device)).float()[:, None]
        self.layers: list[_LayerWeights] = []
        for index, (layer, record) in enumerate(zip(lm.layers, clean.layers)):
            skip = dicts.skip_weight(index)
            self.layers.append(_LayerWeights(
                W_O=_f32(layer.self_attn.o_proj.weight, device),
                W_V=_f32(layer.self_attn.v_proj.weight, device),
                pattern_T=record.pattern.to(device).transpose(1, 2).contiguous(),
                s_in=_scale(layer.input_layernorm, record.r_input, device),
                s_post=_scale(layer.post_attention_layernorm, record.r_post_attention, device),
                s_pre=_scale(lm.mlp_input_module(index), record.r_pre_feedforward, device) * live,
                W_skip_T=None if skip is None else _f32(skip, device).T.contiguous(),
            ))
        self.s_final = _scale(lm.text_model.norm, clean.r_final, device)

    def skip(self, layer: int, grad_out: torch.Tensor) -> torch.Tensor:
        """G_out [B, P', d] on the residual after ``layer`` -> G_mid on the residual before its MLP."""
        w = self.layers[layer]
        if w.W_skip_T is None:
            return grad_out
        n = grad_out.shape[1]
        return grad_out + (grad_out @ w.W_skip_T) * w.s_pre[:n]

    def attention(self, layer: int, grad_mid: torch.Tensor) -> torch.Tensor:
        """G_mid [B, P', d] before ``layer``'s MLP -> G_in on the residual entering ``layer``."""
        w = self.layers[layer]
        B, n, d = grad_mid.shape
        H, hd, n_kv = self.n_heads, self.head_dim, self.n_kv
        per_head = ((grad_mid * w.s_post[:n]) @ w.W_O).view(B, n, H, hd)  # gradient on each head's output
        per_head = per_head.permute(2, 1, 0, 3).reshape(H, n, B * hd)  # [H, query, B * hd]
        on_values = torch.bmm(w.pattern_T[:, :n, :n], per_head)  # [H, key, B * hd]
        on_values = on_values.view(n_kv, H // n_kv, n, B, hd).sum(1)  # GQA: heads of a group share values
        on_values = on_values.permute(2, 1, 0, 3).reshape(B, n, n_kv * hd)
        return grad_mid + (on_values @ w.W_V) * w.s_in[:n]

    def propagate(
        self,
        grad: torch.Tensor,
        start_layer: int,
        start_at_mid: bool,
        read: Callable[[int, torch.Tensor], None],
    ) -> torch.Tensor:
        """Carry ``grad`` [B, P', d] down from ``start_layer`` to the embeddings.

        ``start_at_mid``: the gradient sits before ``start_layer``'s MLP (a feature target) rather than
        after it (logits). ``read(l, G)`` is called with the gradient on the residual after layer l,
        where layer l's MLP output is added, for every l below the start. Returns the gradient on the
        embeddings [B, P', d].
        """
        layer = start_layer
        if not start_at_mid:
            read(layer, grad)
            grad = self.skip(layer, grad)
        grad = self.attention(layer, grad)
        for layer in range(start_layer - 1, -1, -1):
            read(layer, grad)
            grad = self.attention(layer, self.skip(layer, grad))
        return grad


def _f32(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    return weight.detach().to(device=device, dtype=torch.float32)


def _scale(norm: torch.nn.Module, r: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The frozen RMSNorm's per-position, per-channel factor r[p] * (1 + w) as [P, d]."""
    return r.to(device).float()[:, None] * (1.0 + _f32(norm.weight, device))[None, :]
