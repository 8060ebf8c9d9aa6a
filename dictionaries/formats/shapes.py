"""Shape checks of a source file in the file's own tensor names and orientation, shared by the readers of
foreign formats (Gemma Scope 2, circuit-tracer) before they rename and reorient into the native layout.

The encoder fixes a layer's ``d_model`` and ``d_sae``; every other tensor is checked against them, and the
layer against layer 0 (same ``d_model``; a CLT also has one ``d_sae``). The wording of a wrong shape is
:func:`dictionaries.assembly.check_shape`, the same as for native files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..assembly import check_shape
from ..errors import DictionaryFileError

Dim = Literal["d_model", "d_sae"] | int
"""One dimension of an expected shape: a name bound by the encoder, or a fixed size."""


@dataclass(frozen=True)
class SourceDims:
    """The sizes a layer's encoder fixes."""

    d_model: int
    d_sae: int

    def resolve(self, shape: tuple[Dim, ...]) -> tuple[int, ...]:
        """``("d_sae", 3, "d_model")`` -> ``(d_sae, 3, d_model)``."""
        return tuple(getattr(self, dim) if isinstance(dim, str) else dim for dim in shape)


def check_source_shapes(
    path: Path,
    layer: int,
    tensors: Mapping[str, torch.Tensor],
    encoder: str,
    encoder_dims: tuple[Dim, Dim],
    expected: Mapping[str, tuple[Dim, ...]],
    first: SourceDims | None,
    fix: str,
    *,
    one_width: bool = False,
) -> SourceDims:
    """Check layer ``layer`` of the file at ``path``; returns its sizes.

    ``encoder`` names the 2-D encoder, laid out as ``encoder_dims`` (``("d_model", "d_sae")`` or
    ``("d_sae", "d_model")``). ``expected`` gives the shape of every other tensor the file may hold
    (those absent from ``tensors`` are skipped). ``first`` is layer 0's sizes (None for layer 0);
    ``one_width`` (CLTs) requires layer 0's ``d_sae`` too. Raises DictionaryFileError ending in ``fix``.
    """
    enc = tensors[encoder]
    if enc.ndim != 2 or 0 in enc.shape:
        raise DictionaryFileError(
            path, f"tensor {encoder!r} has shape {list(enc.shape)}, expected [{', '.join(map(str, encoder_dims))}]",
            fix,
        )
    sizes = dict(zip(encoder_dims, enc.shape, strict=True))
    dims = SourceDims(d_model=sizes["d_model"], d_sae=sizes["d_sae"])
    if first is not None and dims.d_model != first.d_model:
        raise DictionaryFileError(
            path, f"layer {layer} has d_model {dims.d_model} but layer 0 has d_model {first.d_model}",
            "All layers must be transcoders of the same model; use the matching files",
        )
    if one_width and first is not None and dims.d_sae != first.d_sae:
        raise DictionaryFileError(
            path, f"layer {layer} has d_sae {dims.d_sae} but layer 0 has {first.d_sae}; a CLT has one width", fix
        )
    note = f" (d_model {dims.d_model}, d_sae {dims.d_sae})"
    for name, shape in expected.items():
        if name in tensors:
            check_shape(path, layer, name, tensors[name], dims.resolve(shape), fix, note)
    return dims
