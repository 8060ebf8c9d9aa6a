"""One forward pass of the real model that records everything the frozen replacement model needs.

Freezing (DESIGN.md section 5) keeps the attention patterns and every RMSNorm scale at their values in
this run. Gemma's RMSNorm is ``x * r * (1 + w)`` with ``r = rsqrt(mean(x^2) + eps)``; we record ``r``
per position for the input, post-attention, pre-feedforward and final norms (q/k norms only shape the
attention pattern, which is recorded whole). Shapes below use P = prompt length, d = d_model,
H = attention heads; batch size is always 1 and dropped.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from dictionaries.models.loading import LoadedModel


@dataclass
class LayerRecord:
    r_input: torch.Tensor  # [P] input_layernorm rsqrt factors
    pattern: torch.Tensor  # [H, P, P] attention probabilities (query, key)
    r_post_attention: torch.Tensor  # [P]
    r_pre_feedforward: torch.Tensor  # [P]
    mlp_input: torch.Tensor  # [P, d] transcoder input (pre_feedforward_layernorm output)
    mlp_output: torch.Tensor  # [P, d] true MLP contribution (post_feedforward_layernorm output)


@dataclass
class CleanRun:
    input_ids: torch.Tensor  # [P]
    embeddings: torch.Tensor  # [P, d] as they enter the residual stream (after the sqrt(d) scale)
    layers: list[LayerRecord]
    r_final: torch.Tensor  # [P] final norm rsqrt factors
    final_hidden: torch.Tensor  # [P, d] output of the final norm (what the unembedding reads)

    @property
    def n_positions(self) -> int:
        return int(self.input_ids.shape[0])

    def logits_at(self, lm: LoadedModel, position: int) -> torch.Tensor:
        """Full-vocabulary logits [V] at one position, before any softcap (Gemma 3 has none)."""
        h = self.final_hidden[position].to(lm.lm_head.weight.dtype)
        return lm.lm_head(h).float()


def _rsqrt(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma RMSNorm's frozen factor for input x [1, P, d] -> [P] (computed in float32 like the model)."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + module.eps)[0]


@contextmanager
def eager_attention(lm: LoadedModel):
    """Temporarily compute attention eagerly, so that the attention modules return their patterns."""
    config = lm.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


@torch.no_grad()
def record_clean_run(lm: LoadedModel, input_ids: torch.Tensor) -> CleanRun:
    """Run ``input_ids`` [1, P] once through the model and record the frozen quantities (float32, CPU-side
    tensors stay on the model's devices)."""
    store: dict[tuple, torch.Tensor] = {}

    def save_input(key, rsqrt_of=None):
        def hook(module, args, output):
            if rsqrt_of is not None:
                store[(key, "r")] = _rsqrt(module, args[0])
            store[(key, "out")] = output
        return hook

    def save_pattern(layer):
        def hook(module, args, output):
            store[(("attn", layer), "pattern")] = output[1][0].float()
        return hook

    with ExitStack() as stack, eager_attention(lm):
        def add(module, hook):
            stack.callback(module.register_forward_hook(hook).remove)

        add(lm.text_model.embed_tokens, save_input("embed"))
        for layer_index, layer in enumerate(lm.layers):
            add(layer.input_layernorm, save_input(("in", layer_index), rsqrt_of=True))
            add(layer.self_attn, save_pattern(layer_index))
            add(layer.post_attention_layernorm, save_input(("post", layer_index), rsqrt_of=True))
            add(lm.mlp_input_module(layer_index), save_input(("pre", layer_index), rsqrt_of=True))
            add(lm.mlp_output_module(layer_index), save_input(("mlp_out", layer_index)))
        add(lm.text_model.norm, save_input("final", rsqrt_of=True))
        lm.text_model(input_ids=input_ids, use_cache=False)

    layers = [
        LayerRecord(
            r_input=store[(("in", i), "r")],
            pattern=store[(("attn", i), "pattern")],
            r_post_attention=store[(("post", i), "r")],
            r_pre_feedforward=store[(("pre", i), "r")],
            mlp_input=store[(("pre", i), "out")][0].float(),
            mlp_output=store[(("mlp_out", i), "out")][0].float(),
        )
        for i in range(lm.n_layers)
    ]
    return CleanRun(
        input_ids=input_ids[0],
        embeddings=store[("embed", "out")][0].float(),
        layers=layers,
        r_final=store[("final", "r")],
        final_hidden=store[("final", "out")][0],
    )
