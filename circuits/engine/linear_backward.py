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
full-vocabulary logits are computed.

The pattern product skips what is exactly zero: keys are taken in blocks of ``KEY_BLOCK``, and each block is
multiplied only with the queries that attend to some key in it (causal: none before the block; a sliding-window
layer: none past the window), read off the recorded pattern once per layer. Each head's block product writes into
its value group directly, with no transposed copy of the gradient. At 1,024 tokens this halves the attention's
cost.

Rows are carried in float32, or in bfloat16 when asked (``propagate(..., dtype=torch.bfloat16)``: the weights,
patterns and scales are cast once per dtype and kept; matmuls accumulate in float32 but every operand is rounded to
bfloat16, see docs/design.md for what that costs in accuracy).
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
    key_blocks: list[tuple[int, int, int, int]]  # (first key, end key, first query, end query) of non-zero blocks

    def cast(self, dtype: torch.dtype) -> _LayerWeights:
        """These weights in ``dtype`` (the block list is shared)."""
        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)
        return _LayerWeights(to(self.W_O), to(self.W_V), to(self.pattern_T), to(self.s_in), to(self.s_post),
                             to(self.s_pre), to(self.W_skip_T), self.key_blocks)


KEY_BLOCK = 128  # keys per block of the pattern product


def key_blocks(pattern_T: torch.Tensor, block: int | None = None) -> list[tuple[int, int, int, int]]:
    """For ``pattern_T`` [H, key, query]: per block of keys (``block``, default ``KEY_BLOCK``), the range of queries
    with a non-zero weight on any of them (in any head), as (key start, key end, query start, query end); blocks no
    query attends to are left out."""
    block = block or KEY_BLOCK
    attended = (pattern_T != 0).any(0)  # [key, query]
    n = attended.shape[0]
    out = []
    for start in range(0, n, block):
        end = min(n, start + block)
        queries = attended[start:end].any(0).nonzero().flatten()
        if len(queries):
            out.append((start, end, int(queries[0]), int(queries[-1]) + 1))
    return out


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
            pattern_T = record.pattern.to(here).transpose(1, 2).contiguous()
            self.layers.append(_LayerWeights(
                W_O=_f32(out_proj, here),
                W_V=_f32(submodule(attention, arch.value_projection).weight, here),
                pattern_T=pattern_T,
                s_in=norm.scale(lm.layer_module(index, arch.attention_norm), record.r_input, here),
                s_post=None if output_norm is None else norm.scale(output_norm, record.r_post_attention, here),
                s_pre=norm.scale(lm.mlp_input_module(index), record.r_pre_feedforward, here) * live,
                W_skip_T=None if skip is None else _f32(dicts.computed(index, skip), here).T.contiguous(),
                key_blocks=key_blocks(pattern_T),
            ))
        self.s_final = norm.scale(lm.final_norm, clean.r_final, device)
        self._cast: dict[torch.dtype, list[_LayerWeights]] = {torch.float32: self.layers}

    def weights(self, layer: int, dtype: torch.dtype = torch.float32) -> _LayerWeights:
        """Layer ``layer``'s weights in ``dtype`` (cast once, then kept)."""
        if dtype not in self._cast:
            self._cast[dtype] = [w.cast(dtype) for w in self.layers]
        return self._cast[dtype][layer]

    def skip(self, layer: int, grad_out: torch.Tensor) -> torch.Tensor:
        """G_out [B, P', d] on the residual after ``layer`` -> G_mid on the residual before its MLP."""
        w = self.weights(layer, grad_out.dtype)
        if w.W_skip_T is None:
            return grad_out
        grad_out = grad_out.to(w.s_pre.device)
        n = grad_out.shape[1]
        return grad_out + (grad_out @ w.W_skip_T) * w.s_pre[:n]

    def attention(self, layer: int, grad_mid: torch.Tensor) -> torch.Tensor:
        """G_mid [B, P', d] before ``layer``'s MLP -> G_in on the residual entering ``layer``."""
        w, per_head = self._head_outputs(layer, grad_mid)
        B, n, _ = per_head.shape
        hd, group = self.head_dim, self.n_heads // self.n_kv  # GQA: the heads of a group share values
        on_values = torch.zeros(B, n, self.n_kv * hd, dtype=per_head.dtype, device=per_head.device)
        for h in range(self.n_heads):
            kv = h // group
            on_values[:, :, kv * hd:(kv + 1) * hd] += self._head_values(w, per_head, h)
        return grad_mid.to(per_head.device) + (on_values @ w.W_V) * w.s_in[:n]

    def head_terms(self, layer: int, grad_mid: torch.Tensor) -> torch.Tensor:
        """Each head's term T_h [H, B, P', d] of :meth:`attention` for rows ``grad_mid`` [B, P', d]: the sum over
        h is ``attention(layer, G) - G`` (the route through head h alone)."""
        w, per_head = self._head_outputs(layer, grad_mid)
        n, hd, group = per_head.shape[1], self.head_dim, self.n_heads // self.n_kv
        return torch.stack([
            (self._head_values(w, per_head, h) @ w.W_V[(h // group) * hd:(h // group + 1) * hd]) * w.s_in[:n]
            for h in range(self.n_heads)
        ])

    def _head_outputs(self, layer: int, grad_mid: torch.Tensor) -> tuple[_LayerWeights, torch.Tensor]:
        """``layer``'s weights in the rows' dtype and the gradient on every head's output [B, P', H * hd]."""
        w = self.weights(layer, grad_mid.dtype)
        grad_mid = grad_mid.to(w.W_O.device)
        n = grad_mid.shape[1]
        on_output = grad_mid if w.s_post is None else grad_mid * w.s_post[:n]
        return w, on_output @ w.W_O

    def _head_values(self, w: _LayerWeights, per_head: torch.Tensor, head: int) -> torch.Tensor:
        """Pattern_h^T times head ``head``'s output gradient (in ``per_head`` [B, P', H * hd]): the gradient on the
        values it read [B, P' keys, hd], block by block of keys, skipping the exact zeros."""
        B, n, _ = per_head.shape
        hd = self.head_dim
        out = torch.zeros(B, n, hd, dtype=per_head.dtype, device=per_head.device)
        for key_start, key_end, query_start, query_end in w.key_blocks:
            if key_start >= n:
                break
            key_end, query_end = min(key_end, n), min(query_end, n)
            if query_start < query_end:
                out[:, key_start:key_end] += torch.matmul(w.pattern_T[head, key_start:key_end, query_start:query_end],
                                                          per_head[:, query_start:query_end, head * hd:(head + 1) * hd])
        return out

    def propagate(
        self,
        top_layer: int,
        grad_out: torch.Tensor | None,
        join: Callable[[int], torch.Tensor | None],
        read: Callable[[int, torch.Tensor], None],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Carry gradient rows down from ``top_layer`` to the embeddings; rows may join on the way.

        ``grad_out`` [k, P', d] (or None) sits on the residual after ``top_layer`` (logit targets).
        ``join(l)`` returns rows [m, P', d] that join on the residual before layer l's MLP (feature
        targets at layer l), appended after the rows already present, or None. ``read(l, G)`` is called
        with the gradient on the residual after layer l, where layer l's MLP output is added, for every
        l below a row's start; G holds the rows present so far (a prefix of the final row order).
        Returns the gradient on the embeddings [B, P', d]. The rows are carried in ``dtype`` (joining rows are cast
        to it), and ``read`` sees them in it.
        """
        grad = None if grad_out is None else grad_out.to(dtype)
        for layer in range(top_layer, -1, -1):
            if grad is not None:
                read(layer, grad)
                grad = self.skip(layer, grad)
            joining = join(layer)
            if joining is not None:
                joining = joining.to(dtype)
                grad = joining if grad is None else torch.cat([grad, joining.to(grad.device)])
            if grad is not None:
                grad = self.attention(layer, grad)
        if grad is None:
            raise ValueError("propagate needs at least one gradient row")
        return grad


def _f32(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    return weight.detach().to(device=device, dtype=torch.float32)

