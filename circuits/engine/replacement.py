"""The replacement model's state for one prompt: active features, their decoder writes, and error vectors.

The MLP output of every layer is the replacement formula of :mod:`dictionaries.replacement_mlp` (decoder writes
of the active features + b_dec + skip path + error; the clean output at constant positions), and the error
e_t = y_t - (everything else) makes it exact on the clean run. Here it is evaluated once on the clean run to
find the active features, keep their decoder writes (the edge computation reads them) and take the errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dictionaries.dictionary_set import DictionarySet
from dictionaries.replacement_mlp import ReplacementMlp

from .clean_run import CleanRun


@dataclass
class ActiveFeatures:
    """The n active (layer, position, feature) triples, sorted by layer, then position, then feature."""

    layer: torch.Tensor  # [n] long
    position: torch.Tensor  # [n] long
    index: torch.Tensor  # [n] long
    activation: torch.Tensor  # [n] float32

    def __len__(self) -> int:
        return int(self.layer.shape[0])


@dataclass
class DecoderWrites:
    """What the active features write into the MLP output of one target layer: ``vectors[k]`` (already
    scaled by the activation) at ``position[k]``, from active feature number ``feature[k]``."""

    feature: torch.Tensor  # [m] long, index into ActiveFeatures
    position: torch.Tensor  # [m] long
    vectors: torch.Tensor  # [m, d] float32


@dataclass
class Replacement:
    """The replacement state of one prompt. Only the active features' encoder pre-activations are kept (the
    dense [P, d_sae] per layer would be ~19 MB a token at 262k width); any other entry is
    ``dicts.pre_activations(layer, clean.layers[layer].mlp_input)``, recomputed from the clean run."""

    features: ActiveFeatures
    writes: list[DecoderWrites] | None  # per target layer; None once released (see decoder_writes)
    errors: torch.Tensor  # [n_layers, P, d] float32, zero at constant positions
    reconstruction: torch.Tensor  # [n_layers, P, d] float32, equals the MLP output at constant positions
    feature_pre_activations: torch.Tensor  # [n] float32: active feature k's x @ W_enc + b_enc (its target value)
    constant_positions: torch.Tensor  # [P] bool

    def decoder_writes(self, dicts: DictionarySet) -> list[DecoderWrites]:
        """What the active features write into each target layer: the kept writes, or, once released, the same
        read again from ``dicts``' decoders."""
        if self.writes is not None:
            return self.writes
        mlp = ReplacementMlp(dicts, (len(self.constant_positions),), self.errors.device, self.constant_positions)
        return _decoder_writes(self.features, mlp, len(self.errors), self.errors.shape[-1])

    def release_writes(self) -> None:
        """Drop the kept decoder writes ([active features x target layers, d]: 0.9 GB at 1,024 tokens and L0 20)
        once something else holds them (the edge computation's position groups); ``decoder_writes`` reads them
        again when asked."""
        self.writes = None

    def layer_slice(self, layer: int) -> slice:
        """The active features of ``layer``: a slice of ``features`` (sorted by layer) and of
        ``feature_pre_activations``."""
        start = int((self.features.layer < layer).sum())
        return slice(start, start + int((self.features.layer == layer).sum()))


@torch.no_grad()
def build_replacement(clean: CleanRun, dicts: DictionarySet, constant_positions: torch.Tensor) -> Replacement:
    """Encode every layer's recorded MLP input, decode sparsely, and take the errors. Computed in float32."""
    n_layers = len(clean.layers)
    device = clean.embeddings.device
    constant_positions = constant_positions.to(device)
    keep = (~constant_positions).float()[:, None]
    layers, positions, indices, activations, pre_acts = [], [], [], [], []
    for layer, record in enumerate(clean.layers):
        x = record.mlp_input.to(dicts.encoder_bias(layer).device)
        pre = dicts.pre_activations(layer, x).float().to(device)
        acts = dicts.activation(layer)(pre) * keep
        pos, idx = acts.nonzero(as_tuple=True)  # row-major: sorted by position, then feature
        layers.append(torch.full_like(pos, layer))
        positions.append(pos)
        indices.append(idx)
        activations.append(acts[pos, idx])
        pre_acts.append(pre[pos, idx])
    features = ActiveFeatures(
        torch.cat(layers), torch.cat(positions), torch.cat(indices), torch.cat(activations).float()
    )

    d = clean.embeddings.shape[1]
    mlp = ReplacementMlp(dicts, (clean.n_positions,), device, constant_positions)
    writes = _decoder_writes(features, mlp, n_layers, d)
    outputs = torch.stack([r.mlp_output.to(device) for r in clean.layers])
    recon = torch.stack([mlp.output(t, clean.layers[t].mlp_input.to(device), clean=outputs[t])
                         for t in range(n_layers)])
    errors = torch.where(constant_positions[None, :, None], torch.zeros_like(outputs), outputs - recon)
    return Replacement(features, writes, errors, recon, torch.cat(pre_acts), constant_positions)


@torch.no_grad()
def _decoder_writes(features: ActiveFeatures, mlp: ReplacementMlp, n_layers: int, d: int) -> list[DecoderWrites]:
    """The decoder writes of ``features`` into every target layer, through ``mlp`` (which also adds them into its
    outputs)."""
    device = features.layer.device
    per_target: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_layers)]
    start = 0
    for source in range(n_layers):
        count = int((features.layer == source).sum())
        ids = torch.arange(start, start + count, device=device)
        start += count
        if count == 0:
            continue
        pos = features.position[ids]
        for target, rows in mlp.write(source, pos, features.index[ids], features.activation[ids]):
            per_target[target].append((ids, pos, rows))
    writes = []
    for target in range(n_layers):
        parts = per_target[target]
        if parts:
            writes.append(DecoderWrites(*(torch.cat([p[k] for p in parts]) for k in range(3))))
        else:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            writes.append(DecoderWrites(empty, empty, torch.zeros(0, d, device=device)))
    return writes
