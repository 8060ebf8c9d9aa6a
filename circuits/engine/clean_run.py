"""One forward pass of the real model that records everything the frozen replacement model needs.

Freezing (docs/design.md, "The attribution math") keeps the attention patterns and every RMSNorm scale at their
values in this run. An RMSNorm is ``x * r * gain`` with ``r = rsqrt(mean(x^2) + eps)`` (Gemma's gain is
``1 + w``); we record ``r`` per position for the attention input norm, the attention output norm (where the
family has one), the MLP input norm and the final norm, as the family's
:class:`~dictionaries.models.architecture.Architecture` names them (q/k norms only shape the attention pattern,
which is recorded whole). Shapes below use P = prompt length, d = d_model, H = attention heads; batch size is
always 1 and dropped.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from dictionaries.models.loading import LoadedModel


@dataclass
class LayerRecord:
    r_input: torch.Tensor  # [P] attention input norm rsqrt factors
    pattern: torch.Tensor  # [H, P, P] attention probabilities (query, key)
    r_post_attention: torch.Tensor | None  # [P] attention output norm factors (None: the family has none)
    r_pre_feedforward: torch.Tensor  # [P] MLP input norm factors
    mlp_input: torch.Tensor  # [P, d] transcoder input (the MLP input norm's output)
    mlp_output: torch.Tensor  # [P, d] true MLP contribution (the MLP output site's output)


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
        """Full-vocabulary logits [V] at one position, before any softcap (see ``Architecture.logit_softcap``)."""
        h = self.final_hidden[position].to(lm.lm_head.weight.dtype)
        return lm.lm_head(h).float()


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
    arch = lm.architecture

    def save_input(key, rsqrt_of=None):
        def hook(module, args, output):
            if rsqrt_of is not None:
                store[(key, "r")] = arch.norm.rsqrt(module, args[0])[0]
            store[(key, "out")] = output
        return hook

    def save_pattern(layer):
        def hook(module, args, output):
            store[(("attn", layer), "pattern")] = output[1][0].float()
        return hook

    with ExitStack() as stack, eager_attention(lm):
        def add(module, hook):
            if module is not None:
                stack.callback(module.register_forward_hook(hook).remove)

        add(lm.embedding, save_input("embed"))
        for i in range(lm.n_layers):
            add(lm.layer_module(i, arch.attention_norm), save_input(("in", i), rsqrt_of=True))
            add(lm.attention_module(i), save_pattern(i))
            add(lm.layer_module(i, arch.attention_output_norm), save_input(("post", i), rsqrt_of=True))
            add(lm.mlp_input_module(i), save_input(("pre", i), rsqrt_of=True))
            add(lm.mlp_output_module(i), save_input(("mlp_out", i)))
        add(lm.final_norm, save_input("final", rsqrt_of=True))
        lm.text_model(input_ids=input_ids, use_cache=False)

    layers = [
        LayerRecord(
            r_input=store[(("in", i), "r")],
            pattern=store[(("attn", i), "pattern")],
            r_post_attention=store.get((("post", i), "r")),
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
