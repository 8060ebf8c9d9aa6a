"""What the engine needs to know about a model family's text decoder, written down once per family.

A transformer layer of the families we trace is, with ``h`` the residual stream::

    h = h + attention_output_norm(attention(attention_norm(h)))        (attention_output_norm may be absent)
    h = h + mlp_output(mlp(mlp_input(h)))                              (transcoders read mlp_input's output
                                                                        and stand in for mlp_output's output)

and every norm is an RMSNorm ``x * r * (gain_offset + w)`` with ``r = rsqrt(mean(x^2) + eps)``: Gemma applies
its gain as ``1 + w`` (offset 1), Llama-style models as ``w`` (offset 0). :class:`Architecture` names these
modules (attribute paths inside the text stack or inside one decoder layer), the attention projections and the
config attributes that give head counts, and says how the embedding is scaled and whether logits are softcapped.
The clean run, the frozen model, the linear backward pass, the hook sites and the logit lens read it; nothing
else names a module of the model. Shapes: P = positions, d = d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # tensors are only passed through here: importing the registry must not import torch
    import torch
    from torch import nn


@dataclass(frozen=True)
class NormStyle:
    """How the family's RMSNorm modules apply their gain: ``x * r * (gain_offset + weight)``."""

    gain_offset: float = 1.0
    eps_attribute: str = "eps"  # the module attribute that holds eps

    def gain(self, norm: nn.Module, device: torch.device | None = None) -> torch.Tensor:
        """The per-channel gain ``gain_offset + weight`` [d] in float32."""
        weight = norm.weight.detach().to(device=device if device is not None else norm.weight.device)
        return self.gain_offset + weight.float()

    def rsqrt(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The norm's factor ``r = rsqrt(mean(x^2) + eps)`` for its input x [..., P, d] -> [..., P], float32."""
        return (x.float().pow(2).mean(-1) + getattr(norm, self.eps_attribute)).rsqrt()

    def frozen(self, norm: nn.Module, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The norm with its factor frozen at r [P]: ``x * r * gain`` for x [B, P, d], float32."""
        return x.float() * r.to(x.device)[None, :, None] * self.gain(norm, x.device)

    def scale(self, norm: nn.Module, r: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The frozen norm as a per-position, per-channel factor ``r[p] * gain`` [P, d] (it is linear then)."""
        return r.to(device).float()[:, None] * self.gain(norm, device)[None, :]


@dataclass(frozen=True)
class Architecture:
    """Module names and computation details of one family's text decoder stack (see the module docstring)."""

    # inside the text stack
    embedding: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    # inside one decoder layer
    attention_norm: str = "input_layernorm"
    attention: str = "self_attn"
    attention_output_norm: str | None = "post_attention_layernorm"
    mlp_input: str = "pre_feedforward_layernorm"  # its output is the transcoder input
    mlp_output: str = "post_feedforward_layernorm"  # its output is the MLP's contribution to the residual
    # inside the attention module
    query_projection: str = "q_proj"
    key_projection: str = "k_proj"
    value_projection: str = "v_proj"
    output_projection: str = "o_proj"
    query_norm: str | None = "q_norm"
    key_norm: str | None = "k_norm"
    # config attributes
    n_heads_attribute: str = "num_attention_heads"
    n_kv_heads_attribute: str = "num_key_value_heads"
    head_dim_attribute: str = "head_dim"
    logit_softcap_attribute: str | None = "final_logit_softcapping"
    norm: NormStyle = NormStyle()
    # The token embedding enters the residual stream times sqrt(d_model) ("sqrt_d_model", Gemma) or as it is
    # ("none"); the embedding module applies it, so its output is what the stream receives (token nodes are
    # that output). :func:`~dictionaries.models.loading.wrap_model` checks the module against this.
    embedding_scale: Literal["none", "sqrt_d_model"] = "sqrt_d_model"

    def heads(self, config) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dimension) from a text config."""
        return (int(getattr(config, self.n_heads_attribute)), int(getattr(config, self.n_kv_heads_attribute)),
                int(getattr(config, self.head_dim_attribute)))

    def logit_softcap(self, config) -> float | None:
        """The final logit softcap c (logits -> c * tanh(logits / c)), or None when the model has none."""
        if self.logit_softcap_attribute is None:
            return None
        value = getattr(config, self.logit_softcap_attribute, None)
        return float(value) if value else None

    def softcapped(self, config, logits: torch.Tensor) -> torch.Tensor:
        """Logits as the model's own output has them: ``c * tanh(logits / c)`` with the final softcap c, if any.
        Attribution targets are read before the softcap; probabilities are taken after it."""
        cap = self.logit_softcap(config)
        return logits if cap is None else cap * (logits / cap).tanh()

    def embedding_factor(self, config) -> float:
        """The factor between an embedding row and what enters the residual stream: sqrt(d_model) or 1."""
        return math.sqrt(int(config.hidden_size)) if self.embedding_scale == "sqrt_d_model" else 1.0


def submodule(root: nn.Module, path: str | None) -> nn.Module | None:
    """The module at dotted attribute ``path`` under ``root``, or None when ``path`` is None or absent."""
    if path is None:
        return None
    module: nn.Module | None = root
    for attribute in path.split("."):
        module = getattr(module, attribute, None)
        if module is None:
            return None
    return module
