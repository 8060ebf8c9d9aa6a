"""Random Gemma Scope 2-layout JumpReLU dictionary sets at real scale, for benchmarks/scale.py.

A set is written straight to disk in the Gemma Scope 2 layout that ``dictionaries.formats.gemma_scope_2`` reads,
layer by layer and in chunks of features, so that memory stays bounded by one chunk whatever the width
(a 262k x 640 float32 encoder is 670 MB; the generator holds ``chunk`` x d_model of it at a time):

    ROOT/transcoder_all/layer_{L}_width_{W}_l0_{X}[_affine]/params.safetensors     per-layer (several variants
                                                                                  side by side, as downloaded)
    ROOT/clt_width_{W}_l0_{X}[_affine]/params_layer_{i}.safetensors                cross-layer transcoder
    ROOT/scale_sets/{variant}.json                                                what each variant was made from

Weights (seeded per layer): ``w_enc ~ N(0, 1/d_model)`` (columns of norm ~1), ``w_dec`` rows of norm 1 (a CLT's
row of source i split over its n - i targets, each of norm 1/sqrt(n - i)), ``affine_skip_connection ~ N(0,
1/d_model)``, ``b_enc = b_dec = 0``. Thresholds: one per layer (every entry of ``threshold`` the same value), the
value that the layer's pre-activations on the real model's MLP inputs of ``calibration`` (BOS left out) exceed
``l0`` times per token on average, so the mean L0 on that text is ``l0``. A global threshold rather than
per-feature ones because a per-feature quantile at 20 / 262,144 needs some 13,000 calibration tokens per feature;
as with real encoders, tokens with large inputs then fire more features than the mean.

Every tensor file is created at its full size as a hole (reads as zeros, costs no disk), and only non-zero
values are written, at their offsets. A CLT's ``w_dec`` [d_sae, n_layers, d_model] holds the decoders of source i
to every layer; entries t < i stay holes as the format wants them zero. With ``dense_decoders=False`` (the
default for CLTs: a dense 262k CLT is ~110 GB) only the rows of features that fire on ``decoder_prompts`` are
written; every other row is zero on disk. A trace of one of those prompts reads only active rows, so it sees
exactly what a dense random CLT would show it, at ~12 GB of disk (the encoders) instead of ~110 GB.

A set is written once: into a temporary folder, moved into place, then its marker (the parameters) written
last. :func:`ensure_set` reuses a set whose marker holds the same parameters and rewrites it otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from dictionaries.formats.gemma_scope_2 import PARAMS_FILE, SKIP, TRANSCODER_DIR, width_token
from dictionaries.models.default_model import cache_dir

GENERATOR_VERSION = 1  # bump when the written values change for the same parameters
MARKERS = "scale_sets"
CALIBRATION = (
    "The history of the city began with a small settlement on the banks of the river, where traders from "
    "the north and the south met to exchange salt, wool and grain. Over the centuries the settlement grew "
    "into a market town with a stone bridge, a church and a town hall, and later into a busy port whose "
    "ships carried goods across the sea. In the nineteenth century the railway arrived, factories were "
    "built along the river, and the population doubled within a generation."
)


def bench_dir() -> Path:
    """The default data folder of the scale benchmark: ``$CIRCUITSCOPE_CACHE/bench`` (``~/.cache/circuitscope``)."""
    return cache_dir() / "bench"


@dataclass(frozen=True)
class SetSpec:
    """What a random set is made from; equal specs give equal files (the marker holds ``asdict(spec)``)."""

    model: str  # the model whose MLP inputs calibrate the thresholds (name or checkpoint path)
    n_layers: int
    d_model: int
    width: int
    l0: int
    affine: bool = True
    architecture: Literal["per-layer", "cross-layer"] = "per-layer"
    seed: int = 0
    chunk: int = 16384  # features generated and written at a time
    calibration: str = CALIBRATION
    decoder_prompts: tuple[str, ...] = ()  # CLT without dense decoders: rows written for what fires on these
    dense_decoders: bool = False  # CLT: write every decoder row (all t >= i)
    version: int = field(default=GENERATOR_VERSION)

    @property
    def clt(self) -> bool:
        return self.architecture == "cross-layer"

    @property
    def variant(self) -> str:
        """``width_16k_l0_20_affine``; a CLT's folder name is ``clt_`` + this."""
        return f"width_{width_token(self.width)}_l0_{self.l0}" + ("_affine" if self.affine else "")

    @property
    def marker_name(self) -> str:
        return ("clt_" if self.clt else "") + self.variant

    def path(self, root: Path) -> Path:
        """What to hand the loader: ``root`` (with :meth:`selectors`) for a per-layer variant, the CLT's folder."""
        return root / self.marker_name if self.clt else root

    def selectors(self) -> dict[str, object]:
        """The Gemma Scope 2 selectors (``load_dictionaries(path, **selectors)``) that pick this variant."""
        return {} if self.clt else {"width": width_token(self.width), "l0": str(self.l0), "affine": self.affine}

    def marker(self) -> dict:
        return {**asdict(self), "decoder_prompts": list(self.decoder_prompts)}


# --- a safetensors file written piece by piece ----------------------------------------------------------------
class SparseSafetensors:
    """A float32 safetensors file created at its full size as a hole, its tensors then written in pieces.

    ``shapes``: name -> shape, laid out in that order. Bytes never written read as zeros and take no disk."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        self.shapes, self.offsets, offset = shapes, {}, 0
        for name, shape in shapes.items():
            nbytes = math.prod(shape) * 4
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = offset
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data aligned to 8 bytes, as safetensors writes it
        self.data_start = 8 + len(raw)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite(struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self.fd, self.data_start + offset)

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Write ``values`` (any shape, float32) at flat element ``start`` of tensor ``name``."""
        flat = values.detach().to(torch.float32).contiguous().reshape(-1)
        if start < 0 or start + flat.numel() > math.prod(self.shapes[name]):
            raise ValueError(f"{name}: elements {start}..{start + flat.numel()} outside {self.shapes[name]}")
        self._pwrite(memoryview(flat.numpy()).cast("B"), self.data_start + self.offsets[name] + 4 * start)

    def write_columns(self, name: str, first: int, block: torch.Tensor) -> None:
        """Write ``block`` [rows, c] into columns ``first:first + c`` of 2-D tensor ``name`` (one write per row)."""
        n_cols = self.shapes[name][1]
        if block.shape[1] == n_cols:
            self.write(name, 0, block)
            return
        for row in range(block.shape[0]):
            self.write(name, row * n_cols + first, block[row])

    def close(self) -> None:
        """Flush to disk and drop the file from the page cache (a 24 GB set must not crowd out the machine)."""
        os.fsync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(self.fd)

    def __enter__(self) -> SparseSafetensors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done


# --- one layer ----------------------------------------------------------------------------------------------
def running_top(top: torch.Tensor, pre: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep + 1`` largest values of ``top`` [m] and ``pre`` [T, c] together (a running top over chunks)."""
    values = torch.cat([top, pre.flatten()])
    return values.topk(min(keep + 1, values.numel())).values


def _threshold_between(top: torch.Tensor, keep: int) -> float:
    """A JumpReLU keeps z > threshold: put it between the keep-th and the next largest value (0 if fewer)."""
    if top.numel() <= keep:
        return 0.0
    return max(float(top[keep - 1] + top[keep]) / 2, 0.0)


def write_layer(path: Path, spec: SetSpec, layer: int, x_cal: torch.Tensor, x_dec: torch.Tensor | None) -> dict:
    """Write layer ``layer`` of ``spec`` to ``path``; ``x_cal`` [T, d]: the MLP inputs that calibrate the threshold;
    ``x_dec`` [T2, d]: those of the decoder prompts (a sparse CLT). Returns the threshold and rows written."""
    d, width, n = spec.d_model, spec.width, spec.n_layers
    shapes: dict[str, tuple[int, ...]] = {
        "w_enc": (d, width), "b_enc": (width,), "threshold": (width,),
        "w_dec": (width, n, d) if spec.clt else (width, d), "b_dec": (d,),
    }
    if spec.affine:
        shapes[SKIP] = (d, d)
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + layer)
    keep = x_cal.shape[0] * spec.l0
    top = torch.empty(0)
    most = torch.empty(width)  # each feature's largest pre-activation on the decoder prompts
    with SparseSafetensors(path, shapes) as out:
        for first in range(0, width, spec.chunk):
            w_enc = torch.randn(d, min(spec.chunk, width - first), generator=gen) / d**0.5
            out.write_columns("w_enc", first, w_enc)
            top = running_top(top, x_cal @ w_enc, keep)  # b_enc = 0
            if x_dec is not None and len(x_dec):
                most[first:first + w_enc.shape[1]] = (x_dec @ w_enc).amax(0)
        threshold = _threshold_between(top, keep)
        out.write("threshold", 0, torch.full((width,), threshold))
        if spec.affine:
            out.write(SKIP, 0, torch.randn(d, d, generator=gen) / d**0.5)
        rows = _decoder_rows(spec, x_dec, most, threshold)
        targets = n - layer if spec.clt else 1
        for chunk in rows.split(spec.chunk):
            w_dec = torch.randn(len(chunk), targets, d, generator=gen)
            w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) / targets**0.5
            if not spec.clt:
                _write_rows(out, "w_dec", chunk, w_dec.reshape(len(chunk), d), d)
            else:  # row j's decoders to t >= layer: flat (j * n + layer) * d, (n - layer) * d long
                for j, values in zip(chunk.tolist(), w_dec, strict=True):
                    out.write("w_dec", (j * n + layer) * d, values)
    return {"threshold": threshold, "decoder_rows": len(rows)}


def _decoder_rows(spec: SetSpec, x_dec: torch.Tensor | None, most: torch.Tensor, threshold: float) -> torch.Tensor:
    """Rows whose decoders are written: all, or (a sparse CLT) those that can fire on the decoder prompts, with a
    margin for rounding (a trace's encoder sums in another order)."""
    if not spec.clt or spec.dense_decoders:
        return torch.arange(spec.width)
    if x_dec is None or not len(x_dec):
        return torch.zeros(0, dtype=torch.long)
    return (most > threshold - 1e-3 * abs(threshold) - 1e-6).nonzero().flatten()


def _write_rows(out: SparseSafetensors, name: str, rows: torch.Tensor, values: torch.Tensor, row_len: int) -> None:
    """Rows ``rows`` (sorted) of 2-D ``name``: one write when they are consecutive, else one per row."""
    if len(rows) and int(rows[-1] - rows[0]) == len(rows) - 1:
        out.write(name, int(rows[0]) * row_len, values)
        return
    for j, row in zip(rows.tolist(), values, strict=True):
        out.write(name, j * row_len, row)


# --- a whole set --------------------------------------------------------------------------------------------
def mlp_inputs(lm, prompts: list[str]) -> torch.Tensor:
    """The model's MLP inputs [n_layers, T, d] (float32) on ``prompts``, BOS left out, prompts concatenated."""
    from dictionaries.models.hook_sites import record_mlp_io

    parts = [record_mlp_io(lm, lm.tokenize(p), with_logits=False).inputs[:, 0, 1:].float().cpu() for p in prompts]
    return torch.cat(parts, dim=1) if parts else torch.zeros(lm.n_layers, 0, lm.d_model)


def is_current(spec: SetSpec, root: Path) -> bool:
    """Whether ``root`` holds ``spec``'s set, complete and made from the same parameters."""
    marker = root / MARKERS / f"{spec.marker_name}.json"
    try:
        return json.loads(marker.read_text())["spec"] == spec.marker()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_set(spec: SetSpec, root: Path, model: Callable[[], object], log: Callable[[str], None] = print) -> Path:
    """``spec``'s set under ``root`` (written now unless a marker with the same parameters is there); returns
    the path to load (see :meth:`SetSpec.path`). ``model()`` gives the LoadedModel, called only when writing."""
    if is_current(spec, root):
        return spec.path(root)
    write_set(spec, root, model(), log)
    return spec.path(root)


def write_set(spec: SetSpec, root: Path, lm, log: Callable[[str], None] = print) -> Path:
    """Write ``spec``'s set under ``root`` (replacing an older one of the same variant); see the module docstring."""
    if (lm.n_layers, lm.d_model) != (spec.n_layers, spec.d_model):
        raise ValueError(f"{spec.model}: the model has {lm.n_layers} layers of {lm.d_model}, the spec "
                         f"{spec.n_layers} of {spec.d_model}")
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKERS / f"{spec.marker_name}.json"
    marker.unlink(missing_ok=True)
    x_cal = mlp_inputs(lm, [spec.calibration])
    x_dec = mlp_inputs(lm, list(spec.decoder_prompts)) if spec.clt and not spec.dense_decoders else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.marker_name}.partial-", dir=root))
    layers = []
    try:
        for layer in range(spec.n_layers):
            if spec.clt:
                file = tmp / f"params_layer_{layer}.safetensors"
            else:
                file = tmp / f"layer_{layer}_{spec.variant}" / PARAMS_FILE
                file.parent.mkdir()
            layers.append(write_layer(file, spec, layer, x_cal[layer], None if x_dec is None else x_dec[layer]))
            log(f"{spec.marker_name}: layer {layer + 1}/{spec.n_layers} written "
                f"(threshold {layers[-1]['threshold']:.4g}, {layers[-1]['decoder_rows']} decoder rows)")
        _move_into_place(spec, tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(json.dumps({"spec": spec.marker(), "layers": layers}, indent=1))
    return spec.path(root)


def _move_into_place(spec: SetSpec, tmp: Path, root: Path) -> None:
    if spec.clt:
        shutil.rmtree(root / spec.marker_name, ignore_errors=True)
        os.replace(tmp, root / spec.marker_name)  # (the caller's cleanup of tmp then finds nothing)
        return
    folders = root / TRANSCODER_DIR
    folders.mkdir(exist_ok=True)
    for layer_dir in sorted(tmp.iterdir()):
        shutil.rmtree(folders / layer_dir.name, ignore_errors=True)
        os.replace(layer_dir, folders / layer_dir.name)
