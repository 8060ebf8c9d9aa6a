"""A JumpReLU copy of a TopK (or BatchTopK) set, for formats that store JumpReLU only (Gemma Scope 2).

TopK keeps the k largest pre-activations of each token; JumpReLU keeps those above a fixed threshold. Per layer
the copy gets one threshold for all its features: the value that the layer's pre-activations on the given
contexts exceed k times per token on average (BOS excluded), so its mean L0 on that text is k. Every other
tensor is the original's, unchanged. The copy is an approximation of the TopK set (a token may keep more or
fewer than k features), not the same function.
"""

from __future__ import annotations

import torch

from .assembly import build_dictionary_set
from .config import ActivationConfig
from .dictionary_set import DictionarySet
from .errors import CircuitscopeError
from .models.hook_sites import record_mlp_io
from .models.loading import LoadedModel


@torch.no_grad()
def jumprelu_copy(dicts: DictionarySet, lm: LoadedModel, contexts: torch.Tensor) -> DictionarySet:
    """The JumpReLU copy of the TopK/BatchTopK set ``dicts``, calibrated on ``contexts`` [C, S] (BOS first)."""
    activation = dicts.config.activation
    if activation.type not in ("topk", "batchtopk") or activation.k is None:
        raise CircuitscopeError(f"only TopK/BatchTopK sets need a JumpReLU copy; this one uses {activation.describe()}")
    rec = record_mlp_io(lm, contexts.to(lm.device), with_logits=False)
    layers = []
    for layer in range(dicts.n_layers):
        x = rec.inputs[layer][:, 1:].reshape(-1, dicts.d_model)
        pre = dicts.pre_activations(layer, x).float().flatten()
        keep = min(pre.numel() - 1, activation.k * x.shape[0])
        top = pre.topk(keep + 1).values  # JumpReLU keeps z > threshold: put it between the keep-th and the next
        threshold = max(float(top[-2] + top[-1]) / 2, 0.0)
        tensors = dict(dicts.layer_tensors(layer))
        tensors["threshold"] = torch.full((dicts.widths[layer],), threshold, dtype=tensors["W_enc"].dtype)
        layers.append(tensors)
    config = dicts.config.model_copy(deep=True, update={"activation": ActivationConfig(type="jumprelu")})
    config.metadata["jumprelu_from"] = activation.describe()
    return build_dictionary_set(config, layers, [f"<jumprelu copy, layer {layer}>" for layer in range(dicts.n_layers)])
