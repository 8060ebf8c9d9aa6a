"""Cross-layer transcoder (CLT): an encoder per layer, decoders from each source layer to every later layer.

Features of source layer s read x_s and write to every target layer t >= s::

    features_s = act(x_s @ W_enc_s + b_enc_s)                    W_enc_s [d_model, d_sae], b_enc_s [d_sae]
    output_t   = sum_{s <= t} features_s @ W_dec_s[:, t - s] + b_dec_t (+ x_t @ W_skip_t)
                                                                  W_dec_s [d_sae, n_layers - s, d_model]

Only decoders with t >= s exist: a source cannot write to a layer that runs before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .activations import Activation, build_activation
from .config import DictionaryConfig
from .dictionary_set import DictionarySet, frozen


class CrossLayerTranscoder(DictionarySet):
    def __init__(
        self,
        config: DictionaryConfig,
        W_enc: Sequence[torch.Tensor],
        b_enc: Sequence[torch.Tensor],
        W_dec: Sequence[torch.Tensor],
        b_dec: Sequence[torch.Tensor],
        activations: Sequence[Activation],
        W_skip: Sequence[torch.Tensor] | None = None,
    ):
        super().__init__()
        self.config = config
        self.W_enc = nn.ParameterList([frozen(w) for w in W_enc])
        self.b_enc = nn.ParameterList([frozen(b) for b in b_enc])
        self.W_dec = nn.ParameterList([frozen(w) for w in W_dec])
        self.b_dec = nn.ParameterList([frozen(b) for b in b_dec])
        self.activations = nn.ModuleList(activations)
        self.W_skip = nn.ParameterList([frozen(w) for w in W_skip]) if W_skip is not None else None

    def encoder_weight(self, layer: int) -> torch.Tensor:
        return self.W_enc[layer]

    def encoder_bias(self, layer: int) -> torch.Tensor:
        return self.b_enc[layer]

    def activation(self, layer: int) -> Activation:
        return self.activations[layer]  # type: ignore[return-value]

    def decoder_targets(self, source: int) -> range:
        return range(source, self.n_layers)

    def decoder_weight(self, source: int, target: int) -> torch.Tensor:
        if not source <= target < self.n_layers:
            raise IndexError(f"a CLT feature of layer {source} does not write to layer {target}")
        return self.W_dec[source][:, target - source, :]

    def decoder_bias(self, target: int) -> torch.Tensor:
        return self.b_dec[target]

    def skip_weight(self, layer: int) -> torch.Tensor | None:
        return None if self.W_skip is None else self.W_skip[layer]

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        out = {
            "W_enc": self.W_enc[layer], "b_enc": self.b_enc[layer],
            "W_dec": self.W_dec[layer], "b_dec": self.b_dec[layer],
        }
        threshold = self.activation(layer).threshold_tensor()
        if threshold is not None:
            out["threshold"] = threshold
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip[layer]
        return {k: self.computed(layer, v.detach()) for k, v in out.items()}

    @classmethod
    def from_layer_tensors(
        cls, config: DictionaryConfig, layers: Sequence[dict[str, torch.Tensor]]
    ) -> CrossLayerTranscoder:
        """Build from native per-layer tensors (already validated against ``config``)."""
        return cls(
            config,
            W_enc=[t["W_enc"] for t in layers],
            b_enc=[t["b_enc"] for t in layers],
            W_dec=[t["W_dec"] for t in layers],
            b_dec=[t["b_dec"] for t in layers],
            activations=[
                build_activation(config.activation, t["W_enc"].shape[1], t.get("threshold")) for t in layers
            ],
            W_skip=[t["W_skip"] for t in layers] if config.skip else None,
        )
