"""The frozen replacement model run on the real network: the ground truth that attribution must match.

The Hugging Face model runs with hooks that (a) replace every attention output by the clean run's
pattern applied to the live values, (b) replace every residual-stream RMSNorm's output by ``x * r_clean * gain``
(Gemma's gain is ``1 + w``; the family's architecture says), and (c) replace every MLP output by the
replacement formula of :mod:`dictionaries.replacement_mlp` (feature writes + b_dec + error + the live skip path;
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
from dictionaries.models.architecture import Architecture, NormStyle, submodule
from dictionaries.models.hook_sites import replace_mlp_outputs
from dictionaries.models.loading import LoadedModel
from dictionaries.replacement_mlp import ReplacementMlp

from ..engine.clean_run import CleanRun
from ..engine.replacement import Replacement


@dataclass
class FrozenOutputs:
    mlp_inputs: torch.Tensor  # [n_layers, P, d] transcoder inputs (feature targets read these)
    final_hidden: torch.Tensor  # [P, d] final-norm output (logit targets read these)


def _frozen_norm(norm_style: NormStyle, r: torch.Tensor):
    def hook(module, args, output):
        return norm_style.frozen(module, args[0], r).to(output.dtype)
    return hook


def _frozen_attention(arch: Architecture, pattern: torch.Tensor):
    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        B, P, _ = hidden.shape
        n_heads, n_kv, head_dim = arch.heads(module.config)
        values = submodule(module, arch.value_projection)(hidden).view(B, P, n_kv, head_dim).transpose(1, 2)
        values = values.repeat_interleave(n_heads // n_kv, dim=1)  # [B, H, P, hd]
        mixed = torch.matmul(pattern.to(values.dtype)[None], values)  # [B, H, P, hd]
        return submodule(module, arch.output_projection)(mixed.transpose(1, 2).reshape(B, P, -1)), pattern
    return hook


def add_freezing_hooks(stack: ExitStack, lm: LoadedModel, clean: CleanRun, *, attention: bool = True,
                       norms: bool = True) -> None:
    """Register on ``stack`` (removed when it closes) hooks that fix, to their values in ``clean``, every
    attention pattern (``attention``: each attention output becomes the clean pattern [H, P, P] applied to
    the live values) and every residual-stream RMSNorm scale (``norms``: the attention input and output norms,
    the MLP input norm and the final norm output ``x * r_clean * gain``, as the family's architecture names and
    applies them). The run must have ``clean``'s length. Hooks registered on the same modules afterwards see the
    frozen outputs."""
    arch = lm.architecture

    def add(module, hook, **kwargs):
        if module is not None:
            stack.callback(module.register_forward_hook(hook, **kwargs).remove)

    for index, record in enumerate(clean.layers):
        if norms:
            add(lm.layer_module(index, arch.attention_norm), _frozen_norm(arch.norm, record.r_input))
            add(lm.layer_module(index, arch.attention_output_norm), _frozen_norm(arch.norm, record.r_post_attention))
            add(lm.mlp_input_module(index), _frozen_norm(arch.norm, record.r_pre_feedforward))
        if attention:
            add(lm.attention_module(index), _frozen_attention(arch, record.pattern), with_kwargs=True)
    if norms:
        add(lm.final_norm, _frozen_norm(arch.norm, clean.r_final))


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
    mlp = ReplacementMlp(dicts, (P,), device, replacement.constant_positions)
    for layer, writes in enumerate(replacement.decoder_writes(dicts)):
        mlp.add(layer, writes.position, writes.vectors * feature_scale[writes.feature][:, None])
    mlp_inputs: dict[int, torch.Tensor] = {}
    final: list[torch.Tensor] = []

    def replace(layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mlp_inputs[layer] = x[0].float()
        error = replacement.errors[layer] * error_scale[layer][:, None]
        return mlp.output(layer, mlp_inputs[layer], error, clean.layers[layer].mlp_output)[None]

    embeds = clean.embeddings * embedding_scale[:, None]
    with ExitStack() as stack:
        add_freezing_hooks(stack, lm, clean)
        stack.enter_context(replace_mlp_outputs(lm, replace))
        stack.callback(lm.final_norm.register_forward_hook(lambda m, a, out: final.append(out[0].float())).remove)
        with torch.no_grad():
            lm.text_model(inputs_embeds=embeds[None].to(lm.dtype), use_cache=False)
    return FrozenOutputs(
        mlp_inputs=torch.stack([mlp_inputs[layer] for layer in range(n_layers)]),
        final_hidden=final[0],
    )
