"""The trainer's settings: one typed, validated :class:`TrainerConfig`, checked before any work starts.

Two stages of checking, both ending in one :class:`CircuitscopeError` that names the fix:

- :func:`make_config` validates the values themselves (width 0, k > width, a jumprelu run with no
  L0 target, matryoshka sizes that do not nest, ...).
- :func:`check_before_work` checks them against the world: the model's layer count (read from its
  config only, no weights), that the data path exists, that the output directory is writable and
  does (or, with ``resume``, does not) hold a run already.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import Kind
from ..errors import CircuitscopeError
from ..models.registry import DEFAULT_MODEL

TrainActivation = Literal["topk", "batchtopk", "jumprelu"]
DistributedMode = Literal["data", "layers"]

# Fields that do not change what a run computes: a resumed run may set them differently.
RUN_CONTROL_FIELDS = frozenset(
    {"resume", "force", "stop_after_steps", "progress", "checkpoint_every", "cache_dir", "out"}
)


class TrainerConfig(BaseModel):
    """Everything that defines a training run. Token counts exclude each context's BOS position.

    Batches: every step trains on ``batch_tokens`` tokens drawn from a shuffled block of
    ``batch_tokens * buffer_batches`` tokens (see :mod:`dictionaries.training.harvest`).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = DEFAULT_MODEL
    kind: Kind
    clt_skip: bool = Field(False, description="CLT only: add an affine skip x @ W_skip per layer")
    width: int = Field(ge=1, description="features per layer")
    activation: TrainActivation = "topk"
    k: int | None = Field(None, ge=1, description="topk / batchtopk: features per token")
    target_l0: float | None = Field(None, gt=0, description="jumprelu: the L0 the penalty steers to")
    l0_coefficient: float | None = Field(None, ge=0, description="jumprelu: weight of the L0 penalty")
    matryoshka: list[int] | None = Field(None, description="nested prefix sizes, e.g. [1024, 4096]")
    layers: list[int] | None = Field(None, description="model layers to train (default: all)")
    tokens: int = Field(ge=1, description="training tokens")
    data: str = "model"
    context_length: int = Field(128, ge=2)
    batch_tokens: int = Field(4096, ge=1)
    buffer_batches: int = Field(4, ge=1, description="batches per shuffled block of activations")
    harvest_batch: int = Field(16, ge=1, description="contexts per model forward pass")
    lr: float | None = Field(None, gt=0, description="Adam learning rate (default 2e-4 * sqrt(16384 / width))")
    warmup_steps: int | None = Field(None, ge=0)
    decay_fraction: float = Field(0.2, ge=0, le=1, description="final share of steps with linear decay to 0")
    aux_k: int | None = Field(None, ge=1, description="AuxK: dead features used (default min(d_model / 2, 4 L0))")
    aux_coefficient: float = Field(1 / 32, ge=0)
    dead_after_tokens: int | None = Field(None, ge=1, description="a feature idle this long is dead")
    jumprelu_bandwidth: float = Field(0.05, gt=0)
    jumprelu_init_threshold: float = Field(0.5, gt=0, description="jumprelu start (with --target-l0 it is calibrated)")
    normalize: bool = True
    seed: int = 0
    out: Path
    cache_dir: Path | None = None
    resume: bool = False
    force: bool = False
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    stop_after_steps: int | None = Field(None, ge=1, description="stop (with a checkpoint) after this step")
    distributed: DistributedMode = "data"
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> TrainerConfig:
        _check_sparsity(self)
        _check_matryoshka(self)
        if self.kind != "clt" and self.clt_skip:
            raise ValueError("clt_skip applies to --kind clt only; for a per-layer skip use --kind skip-transcoder")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers is empty; name at least one layer or leave it out for all")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers {self.layers} repeats a layer; name each layer once")
            if self.kind == "clt":
                raise ValueError("a cross-layer transcoder covers every layer; leave out --layers")
        if self.kind == "clt" and self.distributed == "layers":
            raise ValueError("layer sharding trains per-layer dictionaries only; use --distributed data for a CLT")
        if self.resume and self.force:
            raise ValueError("--resume continues the run in --out and --force deletes it; pass one of them")
        return self

    # --- derived values ----------------------------------------------------------------------------
    @property
    def has_skip(self) -> bool:
        return self.kind == "skip-transcoder" or (self.kind == "clt" and self.clt_skip)

    @property
    def architecture(self) -> Literal["per-layer", "cross-layer"]:
        return "cross-layer" if self.kind == "clt" else "per-layer"

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.tokens / self.batch_tokens))

    @property
    def block_tokens(self) -> int:
        return self.batch_tokens * self.buffer_batches

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 * math.sqrt(16384 / self.width)

    @property
    def prefix_sizes(self) -> list[int]:
        """Matryoshka prefix sizes ending with ``width`` ([width] without matryoshka)."""
        sizes = list(self.matryoshka or [])
        return sizes if sizes and sizes[-1] == self.width else sizes + [self.width]

    def resolved_layers(self, n_layers: int) -> list[int]:
        return list(range(n_layers)) if self.layers is None else sorted(self.layers)

    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.total_steps // 20)

    def resolved_aux_k(self, d_model: int) -> int:
        """AuxK's k: as set, else d_model / 2 (Gao et al.) but at most 4x the L0 (k or target): on a CPU each
        AuxK feature costs as much as a live one, and d_model / 2 would be 10x the live features of k=32."""
        if self.aux_k is not None:
            return min(self.aux_k, self.width)
        budget = d_model // 2
        if self.k is not None or self.target_l0 is not None:
            budget = min(budget, 4 * math.ceil(self.k or self.target_l0))
        return max(1, min(budget, self.width))

    def resolved_dead_after(self) -> int:
        return self.dead_after_tokens or max(self.batch_tokens, min(10_000_000, self.tokens // 5))

    def identity(self) -> dict[str, Any]:
        """The settings that define what the run computes (compared on ``resume``)."""
        return self.model_dump(mode="json", exclude=set(RUN_CONTROL_FIELDS))


def _check_sparsity(c: TrainerConfig) -> None:
    if c.activation in ("topk", "batchtopk"):
        if c.k is None:
            raise ValueError(f"--activation {c.activation} needs --k (features per token), e.g. --k 32")
        if c.k > c.width:
            raise ValueError(f"k = {c.k} is larger than the width {c.width}; use k <= width")
        if c.target_l0 is not None or c.l0_coefficient is not None:
            raise ValueError(f"--target-l0 / --l0-coefficient apply to jumprelu; {c.activation} sets L0 with --k")
    else:
        if c.k is not None:
            raise ValueError("jumprelu takes no --k; steer its sparsity with --target-l0 N (or --l0-coefficient)")
        if c.target_l0 is None and c.l0_coefficient is None:
            raise ValueError("--activation jumprelu needs --target-l0 N (or --l0-coefficient C for a plain L0 penalty)")
        if c.target_l0 is not None and c.target_l0 > c.width:
            raise ValueError(f"target L0 {c.target_l0} is larger than the width {c.width}")


def _check_matryoshka(c: TrainerConfig) -> None:
    if c.matryoshka is None:
        return
    sizes = c.matryoshka
    if not sizes or any(s < 1 for s in sizes) or sizes != sorted(set(sizes)):
        raise ValueError(f"matryoshka sizes {sizes} must be increasing positive integers, e.g. 1024,4096")
    if sizes[-1] > c.width:
        raise ValueError(f"matryoshka size {sizes[-1]} is larger than the width {c.width}; end at most at the width")


def parse_int_list(value: str | None, option: str) -> list[int] | None:
    """``"1024,4096"`` -> [1024, 4096] (None stays None); CircuitscopeError naming ``option`` otherwise."""
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise CircuitscopeError(f"{option} {value!r}: expected comma-separated integers, e.g. 1024,4096") from None


def make_config(**values: Any) -> TrainerConfig:
    """A validated TrainerConfig, or one CircuitscopeError listing every bad setting and its fix."""
    try:
        return TrainerConfig(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise CircuitscopeError("bad training settings: " + "; ".join(problems)) from None


def check_before_work(config: TrainerConfig) -> tuple[int, int]:
    """Check ``config`` against the model, the data and the output directory; returns (n_layers, d_model).

    Reads the model's config only (no weights) and touches nothing but a probe file in the output.
    """
    from ..models.loading import model_dimensions
    from .data import hub_documents, parse_data_spec

    n_layers, d_model = model_dimensions(config.model)
    if config.layers is not None:
        unknown = [layer for layer in config.layers if not 0 <= layer < n_layers]
        if unknown:
            raise CircuitscopeError(
                f"unknown layer(s) {unknown}: {config.model} has layers 0..{n_layers - 1}; pick layers in that range"
            )
    spec = parse_data_spec(config.data)  # raises for a missing path
    if spec.kind == "hub":
        next(hub_documents(spec), None)  # `datasets` installed and the hub reachable, before any work
    check_output_directory(config.out, resume=config.resume, force=config.force)
    if config.cache_dir is not None:
        _probe_writable(config.cache_dir, "--cache")
    return n_layers, d_model


def is_run_directory(path: Path) -> bool:
    """True for a directory this trainer wrote: a checkpoint, or a finished dictionary set with training.json."""
    return (path / "checkpoint" / "state.json").is_file() or (path / "training.json").is_file()


def check_output_directory(out: Path, resume: bool, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CircuitscopeError(f"--out {out} is a file; pass a directory path")
    has_run = out.is_dir() and is_run_directory(out)
    if resume:
        if not has_run:
            raise CircuitscopeError(f"--resume: {out} holds no training run; start without --resume")
    elif out.is_dir() and any(out.iterdir()):
        if not has_run:
            raise CircuitscopeError(f"--out {out} exists and holds other files; choose a new or empty directory")
        if not force:
            raise CircuitscopeError(
                f"--out {out} already holds a training run; pass --resume to continue it or --force to start over"
            )
    _probe_writable(out, "--out")


def _probe_writable(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CircuitscopeError(
            f"{what} {directory} is not writable ({exc.strerror}); choose a directory you can write to"
        ) from None
