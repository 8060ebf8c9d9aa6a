"""One interface for a set of dictionaries covering every layer of a model.

Per-layer transcoders (:class:`~dictionaries.transcoder.TranscoderSet`) and cross-layer transcoders
(:class:`~dictionaries.cross_layer_transcoder.CrossLayerTranscoder`) both present it, so the tracer,
the trainer's evaluation and the formats never ask which one they hold. Shapes, with ``d_sae`` the
width of the layer in question::

    encoder_weight(L)       [d_model, d_sae]     encoder_bias(L)  [d_sae]
    decoder_weight(s, t)    [d_sae_s, d_model]   for t in decoder_targets(s)
    decoder_bias(t)         [d_model]            skip_weight(L)   [d_model, d_model] or None
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from .activations import Activation
from .config import DictionaryConfig, Kind
from .errors import DictionaryMismatchError


class DictionarySet(nn.Module, ABC):
    config: DictionaryConfig

    # --- weights -------------------------------------------------------------------------------------
    @abstractmethod
    def encoder_weight(self, layer: int) -> torch.Tensor: ...

    @abstractmethod
    def encoder_bias(self, layer: int) -> torch.Tensor: ...

    @abstractmethod
    def activation(self, layer: int) -> Activation: ...

    @abstractmethod
    def decoder_targets(self, source: int) -> range:
        """The layers that features of ``source`` write to (``range(source, source + 1)`` per layer)."""

    @abstractmethod
    def decoder_weight(self, source: int, target: int) -> torch.Tensor: ...

    @abstractmethod
    def decoder_bias(self, target: int) -> torch.Tensor: ...

    @abstractmethod
    def skip_weight(self, layer: int) -> torch.Tensor | None: ...

    @abstractmethod
    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The native file's tensors of one layer: W_enc, b_enc, W_dec, b_dec, [threshold], [W_skip]."""

    # --- shape ---------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def widths(self) -> list[int]:
        return list(self.config.widths)

    @property
    def kind(self) -> Kind:
        return self.config.kind

    @property
    def has_skip(self) -> bool:
        return self.config.skip

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder_bias(0).dtype

    # --- computation ---------------------------------------------------------------------------------
    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> encoder pre-activations [..., d_sae] = x @ W_enc + b_enc."""
        w = self.encoder_weight(layer)
        return x.to(w.dtype) @ w + self.encoder_bias(layer)

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> feature activations [..., d_sae]."""
        return self.activation(layer)(self.pre_activations(layer, x))

    def decode(
        self, features: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Each layer's output [..., d_model] from every layer's features [..., d_sae_L].

        ``inputs`` (each layer's transcoder input [..., d_model]) is required when the set has a skip
        path, which adds ``inputs[t] @ W_skip_t`` to layer t's output.
        """
        if len(features) != self.n_layers:
            raise ValueError(f"expected features for {self.n_layers} layers, got {len(features)}")
        if self.has_skip and inputs is None:
            raise ValueError("this dictionary set has a skip path: decode needs the layer inputs")
        writes: list[torch.Tensor | float] = [0.0] * self.n_layers
        for source, feats in enumerate(features):
            for target in self.decoder_targets(source):
                writes[target] = writes[target] + feats @ self.decoder_weight(source, target)
        return [self.layer_output(t, writes[t], None if inputs is None else inputs[t]) for t in range(self.n_layers)]

    def layer_output(self, layer: int, writes: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The dictionaries' output at ``layer``: ``writes + b_dec + x @ W_skip`` [..., d_model].

        ``writes`` [..., d_model] is the sum of the decoder rows written into ``layer`` (already scaled by their
        activations); the result has its dtype and device. ``x`` [..., d_model], the layer's transcoder input, is
        needed when the set has a skip path. This is the one place that adds b_dec and the skip path."""
        out = writes + self.decoder_bias(layer).to(device=writes.device, dtype=writes.dtype)
        skip = self.skip_weight(layer)
        if skip is not None:
            if x is None:
                raise ValueError(f"layer {layer} has a skip path: its output needs the layer input")
            out = out + (x.to(device=skip.device, dtype=writes.dtype) @ skip.to(writes.dtype)).to(writes.device)
        return out

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's transcoder input [..., d_model] -> (features per layer, outputs per layer)."""
        features = [self.encode(layer, x) for layer, x in enumerate(inputs)]
        return features, self.decode(features, inputs)

    def check_fits(self, n_layers: int, d_model: int, model_name: str = "the model") -> None:
        """Raise DictionaryMismatchError unless this set covers exactly ``n_layers`` layers of width ``d_model``."""
        if self.d_model != d_model:
            raise DictionaryMismatchError(
                f"the dictionaries have d_model {self.d_model} but {model_name} has d_model {d_model}; "
                "use dictionaries made for this model"
            )
        if self.n_layers != n_layers:
            raise DictionaryMismatchError(
                f"the dictionaries cover {self.n_layers} layers but {model_name} has {n_layers}; "
                "use dictionaries made for this model"
            )


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """Wrap a tensor (possibly memory-mapped) as a parameter without copying it."""
    return nn.Parameter(tensor, requires_grad=False)
