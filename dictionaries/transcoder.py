"""Per-layer transcoders, optionally with a linear skip path, and a set of them covering a model.

A transcoder reads the MLP input x [..., d_in] and predicts the MLP output [..., d_out]::

    features = act(x @ W_enc + b_enc)                      W_enc [d_in, d_sae], b_enc [d_sae]
    output   = features @ W_dec + b_dec (+ x @ W_skip)     W_dec [d_sae, d_out], b_dec [d_out], W_skip [d_in, d_out]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .activations import Activation, build_activation
from .config import DictionaryConfig
from .dictionary_set import DictionarySet, frozen


class Transcoder(nn.Module):
    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        activation: Activation,
        W_skip: torch.Tensor | None = None,
    ):
        super().__init__()
        self.W_enc = frozen(W_enc)
        self.b_enc = frozen(b_enc)
        self.W_dec = frozen(W_dec)
        self.b_dec = frozen(b_dec)
        self.W_skip = frozen(W_skip) if W_skip is not None else None
        self.activation = activation

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    def _computed(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` whole in the dtype and on the device of the biases (a set's methods convert in blocks; see
        :mod:`dictionaries.dictionary_set`)."""
        return weight.to(device=self.b_enc.device, dtype=self.b_enc.dtype)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> [..., d_sae]."""
        return x.to(self.b_enc.dtype) @ self._computed(self.W_enc) + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> sparse feature activations [..., d_sae]."""
        return self.activation(self.pre_activations(x))

    def decode(self, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """features [..., d_sae] (and x [..., d_in] when there is a skip path) -> output [..., d_out]."""
        out = features @ self._computed(self.W_dec) + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip path: decode needs its input x")
            out = out + x.to(self.b_enc.dtype) @ self._computed(self.W_skip)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)


class TranscoderSet(DictionarySet):
    """One :class:`Transcoder` per layer; features of layer L write to layer L only."""

    def __init__(self, transcoders: Sequence[Transcoder], config: DictionaryConfig):
        super().__init__()
        self.transcoders = nn.ModuleList(transcoders)
        self.config = config

    def __getitem__(self, layer: int) -> Transcoder:
        return self.transcoders[layer]  # type: ignore[return-value]

    def encoder_weight(self, layer: int) -> torch.Tensor:
        return self[layer].W_enc

    def encoder_bias(self, layer: int) -> torch.Tensor:
        return self[layer].b_enc

    def activation(self, layer: int) -> Activation:
        return self[layer].activation

    def decoder_targets(self, source: int) -> range:
        return range(source, source + 1)

    def decoder_weight(self, source: int, target: int) -> torch.Tensor:
        if target != source:
            raise IndexError(f"a per-layer transcoder of layer {source} does not write to layer {target}")
        return self[source].W_dec

    def decoder_bias(self, target: int) -> torch.Tensor:
        return self[target].b_dec

    def skip_weight(self, layer: int) -> torch.Tensor | None:
        return self[layer].W_skip

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        tc = self[layer]
        out = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
        threshold = tc.activation.threshold_tensor()
        if threshold is not None:
            out["threshold"] = threshold
        if tc.W_skip is not None:
            out["W_skip"] = tc.W_skip
        return {k: self.computed(layer, v.detach()) for k, v in out.items()}

    @classmethod
    def from_layer_tensors(cls, config: DictionaryConfig, layers: Sequence[dict[str, torch.Tensor]]) -> TranscoderSet:
        """Build from native per-layer tensors (already validated against ``config``)."""
        transcoders = [
            Transcoder(
                t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"],
                build_activation(config.activation, t["W_enc"].shape[1], t.get("threshold")),
                t.get("W_skip"),
            )
            for t in layers
        ]
        return cls(transcoders, config)
