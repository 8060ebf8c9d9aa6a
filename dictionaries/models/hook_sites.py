"""Reading and replacing the MLP at every layer with plain PyTorch forward hooks.

Hook sites are the family's ``Architecture.mlp_input`` and ``mlp_output`` (Gemma Scope 2's convention for
Gemma 3): the transcoder input of layer L is the output of ``layers[L].pre_feedforward_layernorm`` (what the MLP
reads), and the MLP contribution is the output of ``layers[L].post_feedforward_layernorm`` (what is added to the
residual stream). Every hook that replaces MLP outputs goes through :func:`replace_mlp_outputs`. Shapes: B = batch,
S = sequence length, D = d_model, V = vocabulary size, N = number of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .loading import LoadedModel

# fn(layer, mlp_input [B, S, D], mlp_output [B, S, D]) -> new mlp_output [B, S, D] (None: unchanged)
MlpReplacement = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class MlpRecording:
    """What one forward pass read and wrote at every layer's MLP.

    ``inputs[L]``  : [B, S, D] transcoder input of layer L (output of ``pre_feedforward_layernorm``).
    ``outputs[L]`` : [B, S, D] MLP contribution of layer L (output of ``post_feedforward_layernorm``).
    ``logits``     : [B, S, V] the model's logits, or None when recorded with ``with_logits=False``.
    ``inputs`` and ``outputs`` are [N, B, S, D], on the model's input device, detached.
    """

    inputs: torch.Tensor
    outputs: torch.Tensor
    logits: torch.Tensor | None


class _StopForward(Exception):
    """Raised from the last layer's hook to skip the final norm and the (large) unembedding."""


def record_mlp_io(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    with_logits: bool = True,
) -> MlpRecording:
    """Run ``input_ids`` [B, S] through the model once and record every layer's MLP input and output.

    ``attention_mask`` [B, S] (1 = real token) is passed to the model for padded batches. With
    ``with_logits=False`` the pass stops right after the last layer's MLP, so the unembedding
    (262k vocabulary for Gemma 3) is never computed. Active :func:`replace_mlp_outputs` contexts apply:
    the recording then holds the replaced outputs, i.e. what was actually added to the residual.
    Hooks are removed afterwards, also on error. Runs without autograd.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    n = lm.n_layers
    inputs: list[torch.Tensor | None] = [None] * n
    outputs: list[torch.Tensor | None] = [None] * n

    def save_input(layer: int):
        def hook(module, args, output):
            inputs[layer] = output.detach()

        return hook

    def save_output(layer: int):
        def hook(module, args, output):
            outputs[layer] = output.detach()
            if layer == n - 1 and not with_logits:
                raise _StopForward

        return hook

    handles = []
    try:
        for layer in range(n):
            handles.append(lm.mlp_input_module(layer).register_forward_hook(save_input(layer)))
            handles.append(lm.mlp_output_module(layer).register_forward_hook(save_output(layer)))
        logits = None
        with torch.no_grad():
            try:
                result = lm.model(**_model_inputs(lm, input_ids, attention_mask))
                logits = result.logits
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    device = lm.device
    return MlpRecording(
        inputs=torch.stack([x.to(device) for x in inputs]),
        outputs=torch.stack([y.to(device) for y in outputs]),
        logits=logits if with_logits else None,
    )


@contextmanager
def replace_mlp_outputs(
    lm: LoadedModel, fn: MlpReplacement, *, layers: Iterable[int] | None = None
) -> Iterator[None]:
    """While active, the MLP contribution of each layer is ``fn(layer, mlp_input, mlp_output)``.

    ``mlp_input`` [B, S, D] is that layer's ``pre_feedforward_layernorm`` output in the same forward
    pass, ``mlp_output`` [B, S, D] its ``post_feedforward_layernorm`` output (the true MLP contribution).
    ``fn`` returns the tensor [B, S, D] to add to the residual stream instead, or None to keep
    ``mlp_output``. ``layers`` limits the replacement to some layers (default: all). This is how
    dictionaries are spliced into the model. Hooks are removed on exit, also when ``fn`` raises.

    Example: ``with replace_mlp_outputs(lm, lambda L, x, y: torch.zeros_like(y), layers=[3]): lm.model(ids)``
    """
    chosen = range(lm.n_layers) if layers is None else sorted(set(layers))
    current_input: dict[int, torch.Tensor] = {}

    def save_input(layer: int):
        def hook(module, args, output):
            current_input[layer] = output

        return hook

    def replace_output(layer: int):
        def hook(module, args, output):
            mlp_input = current_input.pop(layer)
            new = fn(layer, mlp_input, output)
            if new is None:
                return None
            if not isinstance(new, torch.Tensor) or new.shape != output.shape:
                shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(
                    f"replace_mlp_outputs: fn returned {shape} at layer {layer}; expected a tensor of shape "
                    f"{tuple(output.shape)}"
                )
            return new.to(dtype=output.dtype, device=output.device)

        return hook

    handles = []
    try:
        for layer in chosen:
            handles.append(lm.mlp_input_module(layer).register_forward_hook(save_input(layer)))
            handles.append(lm.mlp_output_module(layer).register_forward_hook(replace_output(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        current_input.clear()


def _model_inputs(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
    kwargs = {"input_ids": input_ids.to(lm.device), "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(lm.device)
    return kwargs
