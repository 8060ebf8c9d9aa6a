"""One interface for a set of dictionaries covering every layer of a model.

Per-layer transcoders (:class:`~dictionaries.transcoder.TranscoderSet`) and cross-layer transcoders
(:class:`~dictionaries.cross_layer_transcoder.CrossLayerTranscoder`) both present it, so the tracer,
the trainer's evaluation and the formats never ask which one they hold. Shapes, with ``d_sae`` the
width of the layer in question::

    encoder_weight(L)       [d_model, d_sae]     encoder_bias(L)  [d_sae]
    decoder_weight(s, t)    [d_sae_s, d_model]   for t in decoder_targets(s)
    decoder_bias(t)         [d_model]            skip_weight(L)   [d_model, d_model] or None

**Where a set computes, and lazy conversion.** A set computes in the dtype and on the device of its vectors
(the tensors of one dimension or fewer: biases and thresholds); :attr:`DictionarySet.dtype` is that dtype. The
matrices (W_enc, W_dec, W_skip) are returned by the accessors as stored: memory-mapped from their files, and after
:meth:`DictionarySet.compute_in` (what :func:`~dictionaries.assembly.cast` calls) possibly in another dtype or
on another device. Every computation converts only what it reads, rounded to the set's dtype exactly as an eager
conversion would: :meth:`~DictionarySet.project` converts a matrix a block of columns at a time (at most
:data:`MAX_CONVERTED_BYTES`), :meth:`~DictionarySet.computed` a slice (decoder rows of active features, encoder
columns), and :meth:`~DictionarySet.layer_tensors` one layer for a save. So a float32 set loaded with
``dtype=torch.bfloat16`` keeps its float32 memory maps instead of holding a bfloat16 copy of every weight.
:meth:`~DictionarySet.materialize` converts the matrices for good: code that edits parameters (the least-squares
refit) calls it; the trainer never edits a set (it trains its own parameters and builds a set at the end).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from .activations import Activation
from .config import DictionaryConfig, Kind
from .errors import DictionaryMismatchError

MAX_CONVERTED_BYTES = 256 * 2**20
"""The most bytes of converted weights :meth:`DictionarySet.project` holds at once."""


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
        """The native file's tensors of one layer: W_enc, b_enc, W_dec, b_dec, [threshold], [W_skip], in the set's
        dtype on its device (matrices stored otherwise are converted whole, one layer per call)."""

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
        """The dtype the set computes in (that of its vectors; its matrices may be stored in another)."""
        return self.encoder_bias(0).dtype

    # --- where it computes ---------------------------------------------------------------------------
    @torch.no_grad()
    def compute_in(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> None:
        """Compute in ``dtype`` on ``device`` from now on (None: unchanged). Converts the vectors (tensors of one
        dimension or fewer: biases, thresholds, at most [d_sae] per layer) now and leaves the matrices as they are
        stored; see the module docstring."""
        for module in self.modules():
            for param in module.parameters(recurse=False):
                if param.ndim <= 1:
                    param.data = param.data.to(device=device, dtype=dtype if param.is_floating_point() else None)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.ndim <= 1:
                    setattr(module, name, buffer.to(device=device, dtype=dtype if buffer.is_floating_point() else None))

    def materialize(self) -> DictionarySet:
        """Convert the matrices to the set's dtype and device now (copying them out of their memory maps when that
        changes them), so that every parameter is what the set computes with; returns the set."""
        bias = self.encoder_bias(0)
        return self.to(device=bias.device, dtype=bias.dtype)

    def computed(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a slice of one of ``layer``'s matrices) in the set's dtype on its device: a copy of that
        slice only, or ``tensor`` itself when it already is."""
        bias = self.encoder_bias(layer)
        return tensor.to(device=bias.device, dtype=bias.dtype)

    def project(self, layer: int, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None
                ) -> torch.Tensor:
        """x [..., k] @ weight [k, n] -> [..., n] in ``dtype`` (default: the set's) on the set's device.

        ``weight`` is one of ``layer``'s matrices as stored; it is rounded to the set's dtype (then taken to
        ``dtype``) as an eager conversion would, a block of columns at a time, so that at most
        :data:`MAX_CONVERTED_BYTES` of converted weights exist at once (all of it in one block when it fits, or
        when nothing needs converting)."""
        bias = self.encoder_bias(layer)
        dtype = dtype or bias.dtype
        x = x.to(device=bias.device, dtype=dtype)
        if weight.device == bias.device and weight.dtype == bias.dtype == dtype:
            return x @ weight

        def converted(block: torch.Tensor) -> torch.Tensor:
            return block.to(device=bias.device, dtype=bias.dtype).to(dtype)

        per_column = weight.shape[0] * (bias.dtype.itemsize + dtype.itemsize)
        step = max(1, MAX_CONVERTED_BYTES // per_column)
        if step >= weight.shape[1]:
            return x @ converted(weight)
        out = x.new_empty(*x.shape[:-1], weight.shape[1])
        for start in range(0, weight.shape[1], step):
            out[..., start:start + step] = x @ converted(weight[:, start:start + step])
        return out

    # --- computation ---------------------------------------------------------------------------------
    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> encoder pre-activations [..., d_sae] = x @ W_enc + b_enc, on the set's device."""
        return self.project(layer, x, self.encoder_weight(layer)) + self.encoder_bias(layer)

    def encoder_columns(self, layer: int, index: torch.Tensor) -> torch.Tensor:
        """The encoder directions W_enc[:, index] [d_model, k] of features ``index`` [k], in the set's dtype on its
        device (only these columns are read)."""
        weight = self.encoder_weight(layer)
        return self.computed(layer, weight[:, index.to(weight.device)])

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
                writes[target] = writes[target] + self.project(source, feats, self.decoder_weight(source, target))
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
            out = out + self.project(layer, x, skip, writes.dtype).to(writes.device)
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
