"""Refit the linear half of per-layer transcoders by least squares, with their encoders (and so every
feature's activations and the L0) left exactly as they are.

A trained transcoder predicts ``y = a @ W_dec + b_dec (+ x @ W_skip)`` from its features ``a = act(x @ W_enc +
b_enc)``. With the encoder fixed that prediction is linear in (W_dec, W_skip, b_dec), so the best decoder for a
set of tokens solves normal equations. Per layer, with Z = [a | x | 1] [N, p] (p = d_sae + d_model + 1 with a
skip path, d_sae + 1 without) and the MLP outputs Y [N, d]::

    (Z^T Z + lambda I) W = Z^T Y + lambda W_0,      lambda = ridge * mean(diag(Z^T Z))

i.e. the least-squares fit pulled towards the current weights W_0 by a small ridge: a feature that never fires
in the data keeps its decoder row. Z^T Z and Z^T Y are summed over batches in float64 (BOS excluded), so memory
is O(p^2) per layer whatever the number of tokens. Stochastic training leaves the decoder short of this optimum
on short runs; the refit closes that gap on the given text (use the training split, then measure on held-out
text). CLTs are not supported (their decoders are shared across layers' features).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..dictionary_set import DictionarySet
from ..errors import CircuitscopeError
from ..models.hook_sites import record_mlp_io
from ..models.loading import LoadedModel


@torch.no_grad()
def refit_decoders(dicts: DictionarySet, lm: LoadedModel, contexts: torch.Tensor, *, batch_size: int = 8,
                   ridge: float = 1e-6, progress: bool = False) -> DictionarySet:
    """Refit every layer's W_dec, b_dec (and W_skip) of the per-layer set ``dicts`` on ``contexts`` [C, S] (BOS
    at position 0, left out); the set's parameters get the new tensors and ``dicts`` is returned. Float32 sets
    only (load others with dtype=torch.float32)."""
    if dicts.kind == "clt":
        raise CircuitscopeError("refitting decoders works for per-layer transcoders, not for a CLT")
    if dicts.dtype != torch.float32:
        raise CircuitscopeError(f"refit a float32 copy of the set (it is {dicts.dtype}); load it with dtype=float32")
    dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
    dicts.materialize()  # the parameters edited below must be the float32 ones the set computes with
    n_layers, d = dicts.n_layers, dicts.d_model
    sizes = [w + (d if dicts.has_skip else 0) + 1 for w in dicts.widths]
    gram = [torch.zeros(p, p, dtype=torch.float64) for p in sizes]
    cross = [torch.zeros(p, d, dtype=torch.float64) for p in sizes]
    for ids in tqdm(contexts.split(batch_size), desc="refitting decoders", disable=not progress):
        rec = record_mlp_io(lm, ids.to(lm.device), with_logits=False)
        for layer in range(n_layers):
            x = rec.inputs[layer][:, 1:].reshape(-1, d).float().cpu()
            y = rec.outputs[layer][:, 1:].reshape(-1, d).float().cpu()
            z = _design(dicts, layer, x)
            gram[layer] += (z.T @ z).double()
            cross[layer] += (z.T @ y).double()
    for layer in range(n_layers):
        _solve_layer(dicts, layer, gram[layer], cross[layer], ridge)
    return dicts


def _design(dicts: DictionarySet, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Z = [features | x (skip only) | 1], [N, p]."""
    parts = [dicts.encode(layer, x).float()]
    if dicts.has_skip:
        parts.append(x)
    parts.append(torch.ones(x.shape[0], 1))
    return torch.cat(parts, dim=1)


def _solve_layer(dicts: DictionarySet, layer: int, gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> None:
    width = dicts.widths[layer]
    current = [dicts.decoder_weight(layer, layer)]
    if dicts.has_skip:
        current.append(dicts.skip_weight(layer))
    current.append(dicts.decoder_bias(layer).view(1, -1))
    w0 = torch.cat([t.detach().double() for t in current])
    lam = ridge * float(gram.diagonal().mean()) if ridge > 0 else 0.0
    system = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    solution = torch.linalg.solve(system, cross + lam * w0).float()
    # New storage rather than copy_: the set's tensors may be read-only memory maps of its files.
    dicts.decoder_weight(layer, layer).data = solution[:width].clone()
    if dicts.has_skip:
        dicts.skip_weight(layer).data = solution[width:-1].clone()
    dicts.decoder_bias(layer).data = solution[-1].clone()
