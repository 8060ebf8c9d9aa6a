"""Vector-Jacobian products of the frozen replacement model, written out by hand.

With attention patterns and norm scales frozen and the MLPs replaced, the model is linear in its
sources, and its transpose is the map below, applied to a batch of B gradient rows G [B, P', d] on the
residual stream (P' = the positions up to the latest target in the batch; later positions cannot
influence earlier ones). Going down through layer l, from the residual after layer l (``out``):

    skip:       G_mid = G_out + ((G_out @ W_skip^T) * s_pre)
                s_pre[p] = r_pre[p] * gain_pre, 0 at constant positions
    attention:  G_in  = G_mid + ((Pattern^T (G_mid * s_post) W_O) W_V) * s_in     per head, GQA groups summed

where s_* are the frozen RMSNorm scales ``r[p] * gain`` (Gemma's gain is ``1 + w``; s_post is 1 for a family
without an attention output norm), read through the family's
:class:`~dictionaries.models.architecture.Architecture`. The MLP itself contributes nothing: its output is a sum of
sources (features, errors) and constants. Nothing above the targets' layer is ever touched, and no
full-vocabulary logits are computed. Everything runs in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dictionaries.dictionary_set import DictionarySet
from dictionaries.models.architecture import submodule
from dictionaries.models.loading import LoadedModel

from .clean_run import CleanRun


@dataclass
class _LayerWeights:
    W_O: torch.Tensor  # [d, H * hd]   (the output projection's weight)
    W_V: torch.Tensor  # [n_kv * hd, d] (the value projection's weight)
    pattern_T: torch.Tensor  # [H, P, P] pattern transposed: [h, key, query]
    s_in: torch.Tensor  # [P, d]
    s_post: torch.Tensor | None  # [P, d]; None: no attention output norm
    s_pre: torch.Tensor  # [P, d], zero at constant positions
    W_skip_T: torch.Tensor | None  # [d, d]


class FrozenLinearBackward:
    """Propagates gradient rows down the frozen model; see the module docstring for the math."""

    def __init__(self, lm: LoadedModel, clean: CleanRun, dicts: DictionarySet, constant_positions: torch.Tensor,
                 device: torch.device):
        arch = lm.architecture
        norm = arch.norm
        self.n_heads, self.n_kv, self.head_dim = arch.heads(lm.config)
        self.layers: list[_LayerWeights] = []
        for index, record in enumerate(clean.layers):
            attention = lm.attention_module(index)
            out_proj = submodule(attention, arch.output_projection).weight
            # each layer's weights stay on that layer's device (models spread over several GPUs)
            here = out_proj.device
            live = (~constant_positions.to(here)).float()[:, None]
            skip = dicts.skip_weight(index)
            output_norm = lm.layer_module(index, arch.attention_output_norm)
            self.layers.append(_LayerWeights(
                W_O=_f32(out_proj, here),
                W_V=_f32(submodule(attention, arch.value_projection).weight, here),
                pattern_T=record.pattern.to(here).transpose(1, 2).contiguous(),
                s_in=norm.scale(lm.layer_module(index, arch.attention_norm), record.r_input, here),
                s_post=None if output_norm is None else norm.scale(output_norm, record.r_post_attention, here),
                s_pre=norm.scale(lm.mlp_input_module(index), record.r_pre_feedforward, here) * live,
                W_skip_T=None if skip is None else _f32(dicts.computed(index, skip), here).T.contiguous(),
            ))
        self.s_final = norm.scale(lm.final_norm, clean.r_final, device)

    def skip(self, layer: int, grad_out: torch.Tensor) -> torch.Tensor:
        """G_out [B, P', d] on the residual after ``layer`` -> G_mid on the residual before its MLP."""
        w = self.layers[layer]
        if w.W_skip_T is None:
            return grad_out
        grad_out = grad_out.to(w.s_pre.device)
        n = grad_out.shape[1]
        return grad_out + (grad_out @ w.W_skip_T) * w.s_pre[:n]

    def attention(self, layer: int, grad_mid: torch.Tensor) -> torch.Tensor:
        """G_mid [B, P', d] before ``layer``'s MLP -> G_in on the residual entering ``layer``."""
        w = self.layers[layer]
        grad_mid = grad_mid.to(w.W_O.device)
        B, n, d = grad_mid.shape
        H, hd, n_kv = self.n_heads, self.head_dim, self.n_kv
        on_output = grad_mid if w.s_post is None else grad_mid * w.s_post[:n]
        per_head = (on_output @ w.W_O).view(B, n, H, hd)  # gradient on each head's output
        per_head = per_head.permute(2, 1, 0, 3).reshape(H, n, B * hd)  # [H, query, B * hd]
        on_values = torch.bmm(w.pattern_T[:, :n, :n], per_head)  # [H, key, B * hd]
        on_values = on_values.view(n_kv, H // n_kv, n, B, hd).sum(1)  # GQA: heads of a group share values
        on_values = on_values.permute(2, 1, 0, 3).reshape(B, n, n_kv * hd)
        return grad_mid + (on_values @ w.W_V) * w.s_in[:n]

    def propagate(
        self,
        top_layer: int,
        grad_out: torch.Tensor | None,
        join: Callable[[int], torch.Tensor | None],
        read: Callable[[int, torch.Tensor], None],
    ) -> torch.Tensor:
        """Carry gradient rows down from ``top_layer`` to the embeddings; rows may join on the way.

        ``grad_out`` [k, P', d] (or None) sits on the residual after ``top_layer`` (logit targets).
        ``join(l)`` returns rows [m, P', d] that join on the residual before layer l's MLP (feature
        targets at layer l), appended after the rows already present, or None. ``read(l, G)`` is called
        with the gradient on the residual after layer l, where layer l's MLP output is added, for every
        l below a row's start; G holds the rows present so far (a prefix of the final row order).
        Returns the gradient on the embeddings [B, P', d].
        """
        grad = grad_out
        for layer in range(top_layer, -1, -1):
            if grad is not None:
                read(layer, grad)
                grad = self.skip(layer, grad)
            joining = join(layer)
            if joining is not None:
                grad = joining if grad is None else torch.cat([grad, joining.to(grad.device)])
            if grad is not None:
                grad = self.attention(layer, grad)
        if grad is None:
            raise ValueError("propagate needs at least one gradient row")
        return grad


def _f32(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    return weight.detach().to(device=device, dtype=torch.float32)

