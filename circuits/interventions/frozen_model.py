"""The frozen replacement model run on the real network: the ground truth that attribution must match.

The Hugging Face model runs with hooks that (a) replace every attention output by the clean run's
pattern applied to the live values, (b) replace every RMSNorm's output by ``x * r_clean * (1 + w)``, and
(c) replace every MLP output by the replacement (feature writes + b_dec + error + the live skip path;
the clean output at constant positions). Sources can be scaled: ``embedding_scale`` per position,
``feature_scale`` per active feature, ``error_scale`` per (layer, position); setting one to 0 removes
that source. The model is then linear in the sources, and an edge weight is exactly the change of its
target when its source is removed.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from dictionaries.dictionary_set import DictionarySet
from dictionaries.models.loading import LoadedModel

from ..engine.clean_run import CleanRun
from ..engine.replacement import Replacement


@dataclass
class FrozenOutputs:
    mlp_inputs: torch.Tensor  # [n_layers, P, d] transcoder inputs (feature targets read these)
    final_hidden: torch.Tensor  # [P, d] final-norm output (logit targets read these)


def _frozen_norm(r: torch.Tensor):
    def hook(module, args, output):
        x = args[0]
        return (x.float() * r.to(x.device)[None, :, None] * (1.0 + module.weight.float())).to(output.dtype)
    return hook


def _frozen_attention(pattern: torch.Tensor):
    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        B, P, _ = hidden.shape
        values = module.v_proj(hidden).view(B, P, -1, module.head_dim).transpose(1, 2)
        values = values.repeat_interleave(module.num_key_value_groups, dim=1)  # [B, H, P, hd]
        mixed = torch.matmul(pattern.to(values.dtype)[None], values)  # [B, H, P, hd]
        return module.o_proj(mixed.transpose(1, 2).reshape(B, P, -1)), pattern
    return hook


def add_freezing_hooks(stack: ExitStack, lm: LoadedModel, clean: CleanRun, *, attention: bool = True,
                       norms: bool = True) -> None:
    """Register on ``stack`` (removed when it closes) hooks that fix, to their values in ``clean``, every
    attention pattern (``attention``: each attention output becomes the clean pattern [H, P, P] applied to
    the live values) and every residual-stream RMSNorm scale (``norms``: input, post-attention,
    pre-feedforward and final norms output ``x * r_clean * (1 + w)``). The run must have ``clean``'s length.
    Hooks registered on the same modules afterwards see the frozen outputs."""
    def add(module, hook, **kwargs):
        stack.callback(module.register_forward_hook(hook, **kwargs).remove)

    for index, (layer, record) in enumerate(zip(lm.layers, clean.layers)):
        if norms:
            add(layer.input_layernorm, _frozen_norm(record.r_input))
        if attention:
            add(layer.self_attn, _frozen_attention(record.pattern), with_kwargs=True)
        if norms:
            add(layer.post_attention_layernorm, _frozen_norm(record.r_post_attention))
            add(lm.mlp_input_module(index), _frozen_norm(record.r_pre_feedforward))
    if norms:
        add(lm.text_model.norm, _frozen_norm(clean.r_final))


def run_frozen(
    lm: LoadedModel,
    clean: CleanRun,
    replacement: Replacement,
    dicts: DictionarySet,
    embedding_scale: torch.Tensor | None = None,
    feature_scale: torch.Tensor | None = None,
    error_scale: torch.Tensor | None = None,
) -> FrozenOutputs:
    """One forward pass of the frozen replacement model with scaled sources (all 1: the clean run)."""
    n_layers, P = len(clean.layers), clean.n_positions
    device = clean.embeddings.device
    embedding_scale = torch.ones(P, device=device) if embedding_scale is None else embedding_scale
    feature_scale = torch.ones(len(replacement.features), device=device) if feature_scale is None else feature_scale
    error_scale = torch.ones(n_layers, P, device=device) if error_scale is None else error_scale
    constant = replacement.constant_positions.to(device)[:, None]
    captured: dict[int, torch.Tensor] = {}

    def mlp_hook(layer):
        writes = replacement.writes[layer]
        fixed = torch.zeros(P, clean.embeddings.shape[1], device=device)
        fixed.index_add_(0, writes.position, writes.vectors * feature_scale[writes.feature][:, None])
        fixed += dicts.decoder_bias(layer).float() + replacement.errors[layer] * error_scale[layer][:, None]

        def hook(module, args, output):
            x = captured[layer][0].float()
            out = fixed
            skip = dicts.skip_weight(layer)
            if skip is not None:
                out = out + x @ skip.float()
            out = torch.where(constant, clean.layers[layer].mlp_output, out)
            return out[None].to(output.dtype)
        return hook

    def capture(layer):
        def hook(module, args, output):
            captured[layer] = output
        return hook

    embeds = (clean.embeddings * embedding_scale[:, None])[None].to(lm.dtype)
    with ExitStack() as stack:
        add_freezing_hooks(stack, lm, clean)
        for index in range(n_layers):
            stack.callback(lm.mlp_input_module(index).register_forward_hook(capture(index)).remove)
            stack.callback(lm.mlp_output_module(index).register_forward_hook(mlp_hook(index)).remove)
        stack.callback(lm.text_model.norm.register_forward_hook(capture(-1)).remove)
        with torch.no_grad():
            lm.text_model(inputs_embeds=embeds, use_cache=False)
    return FrozenOutputs(
        mlp_inputs=torch.stack([captured[layer][0].float() for layer in range(n_layers)]),
        final_hidden=captured[-1][0].float(),
    )
