"""Typed configuration of a dictionary set: the JSON half of the native on-disk format.

The native format is a directory holding ``config.json`` (a :class:`DictionaryConfig`) and one
``layer_{L}.safetensors`` per layer. Orientation is input-major throughout::

    features  = act(x @ W_enc + b_enc)                  x: [..., d_model], W_enc: [d_model, d_sae]
    output_t  = sum_s features_s @ W_dec[s -> t] + b_dec_t (+ x_t @ W_skip_t)
                                                       W_dec: [d_sae, d_model], W_skip: [d_model, d_model]

A per-layer transcoder's ``W_dec`` is [d_sae, d_model]; a cross-layer transcoder's ``W_dec`` in the
file of source layer s is [d_sae, n_layers - s, d_model], its index j decoding to target layer s + j.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

FORMAT_NAME = "circuitscope.dictionaries"
FORMAT_VERSION = 1
ORIENTATION = (
    "input-major: features = act(x @ W_enc + b_enc), W_enc [d_model, d_sae]; "
    "output_t = sum over sources s <= t of features_s @ W_dec[s->t] + b_dec_t (+ x_t @ W_skip_t); "
    "W_dec [d_sae, d_model] per layer, or [d_sae, n_layers - s, d_model] for a cross-layer source s "
    "(index j targets layer s + j); W_skip [d_model, d_model]; JumpReLU: relu(z) * (z > threshold)"
)

Architecture = Literal["per-layer", "cross-layer"]
Kind = Literal["transcoder", "skip-transcoder", "clt"]
SourceFormat = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$")]
"""Where the weights came from: ``trained`` or the name of the registered format they were read from
(``gemma-scope-2``); a name, not a Literal, so that a new format needs no edit here."""
DType = Literal["float32", "bfloat16", "float16"]


class ActivationConfig(BaseModel):
    """The sparsity nonlinearity. ``jumprelu`` keeps a per-feature threshold tensor in the weights;
    ``topk`` keeps the k largest per token; ``batchtopk`` is a training-time activation that is saved
    as ``jumprelu`` with a calibrated threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["jumprelu", "relu", "topk", "batchtopk"]
    k: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _k_matches_type(self) -> ActivationConfig:
        needs_k = self.type in ("topk", "batchtopk")
        if needs_k and self.k is None:
            raise ValueError(f"activation {self.type!r} needs k >= 1")
        if not needs_k and self.k is not None:
            raise ValueError(f"activation {self.type!r} takes no k")
        return self

    def describe(self) -> str:
        return self.type if self.k is None else f"{self.type}(k={self.k})"


class DictionaryConfig(BaseModel):
    """Everything about a dictionary set except its tensors."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["circuitscope.dictionaries"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    architecture: Architecture
    skip: bool
    n_layers: int = Field(ge=1)
    d_model: int = Field(ge=1)
    widths: list[int]
    activation: ActivationConfig
    dtype: DType = "float32"
    model: str | None = None
    hook_input: str = "pre_feedforward_layernorm"
    hook_output: str = "post_feedforward_layernorm"
    source_format: SourceFormat = "native"
    orientation: str = ORIENTATION
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _widths_cover_layers(self) -> DictionaryConfig:
        if len(self.widths) != self.n_layers:
            raise ValueError(f"widths has {len(self.widths)} entries for {self.n_layers} layers")
        if any(w < 1 for w in self.widths):
            raise ValueError("every width must be >= 1")
        if self.architecture == "cross-layer" and len(set(self.widths)) != 1:
            raise ValueError("a cross-layer transcoder has one width for all layers")
        return self

    @property
    def kind(self) -> Kind:
        if self.architecture == "cross-layer":
            return "clt"
        return "skip-transcoder" if self.skip else "transcoder"


def dtype_name(dtype: torch.dtype) -> DType:
    """``torch.bfloat16`` -> ``"bfloat16"``; raises ValueError for a dtype the format does not store."""
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dictionaries are stored as float32, bfloat16 or float16, not {name}")
    return name  # type: ignore[return-value]


def torch_dtype(name: DType) -> torch.dtype:
    return getattr(torch, name)
