"""Training checkpoints: safetensors + JSON (no pickle), written atomically, resumed exactly.

``OUT/checkpoint/`` holds ``state.json`` (step, tokens, the run's settings, the optimizer's scalar
settings, the process layout) and ``rank_{r}.safetensors`` with every tensor of the run: parameters
and buffers (``model.*``: normalisation scales, dead-feature counters, BatchTopK threshold), Adam's
``exp_avg``/``exp_avg_sq``/``step`` (``optim.{i}.*``) and the torch RNG state (``rng.torch``).
Data-parallel ranks hold identical state, so only rank 0 writes; layer-sharded ranks each write theirs.

There is no other state: data and shuffling are pure functions of (seed, step) (see
:mod:`.harvest`), so (parameters, optimizer, step) determine the rest of the run, and a run stopped
at step s and resumed ends with the same weights, bit for bit, as one that never stopped.

A checkpoint is written to ``.checkpoint.staging`` and swapped in by renames; if a crash falls between
the renames, the previous checkpoint is found at ``.checkpoint.old``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from pydantic import BaseModel

from ..atomic_output import write_text_atomic
from ..errors import CircuitscopeError
from ..safetensors_io import read_tensors, write_tensors
from .distributed import DistributedContext
from .trainable import TrainableDictionaries
from .trainer_config import TrainerConfig

CHECKPOINT_FORMAT = "circuitscope.training-checkpoint"
STATE_FILE = "state.json"


class CheckpointState(BaseModel):
    format: str = CHECKPOINT_FORMAT
    version: int = 1
    step: int
    tokens_seen: int
    world_size: int
    mode: str
    layer_shares: list[list[int]]
    settings: dict
    optimizer_groups: list[dict]


def checkpoint_directory(out: Path) -> Path | None:
    """The newest complete checkpoint in ``out``, or None."""
    for name in ("checkpoint", ".checkpoint.old"):
        if (out / name / STATE_FILE).is_file():
            return out / name
    return None


def _rank_file(rank: int) -> str:
    return f"rank_{rank}.safetensors"


def state_tensors(model: TrainableDictionaries, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{name}": t for name, t in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def save_checkpoint(out: Path, model: TrainableDictionaries, optimizer: torch.optim.Optimizer, step: int,
                    tokens_seen: int, config: TrainerConfig, ctx: DistributedContext,
                    shares: list[list[int]]) -> None:
    """Write the checkpoint of ``step`` (every rank calls this)."""
    staging, final, old = out / ".checkpoint.staging", out / "checkpoint", out / ".checkpoint.old"
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    ctx.barrier()
    if ctx.is_main or ctx.layer_sharded:
        write_tensors(staging / _rank_file(ctx.rank), state_tensors(model, optimizer))
    ctx.barrier()
    if ctx.is_main:
        groups = optimizer.state_dict()["param_groups"]
        state = CheckpointState(
            step=step, tokens_seen=tokens_seen, world_size=ctx.world_size, mode=ctx.mode, layer_shares=shares,
            settings=config.identity(), optimizer_groups=groups,
        )
        write_text_atomic(staging / STATE_FILE, state.model_dump_json(indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()


# Settings a resumed run may change: ``tokens`` lengthens or shortens the run (the learning-rate schedule's warm-up
# and decay follow the new length from the checkpoint's step on; a run already past its new end finishes at once).
RESIZABLE = frozenset({"tokens"})


def load_checkpoint(out: Path, model: TrainableDictionaries, optimizer: torch.optim.Optimizer,
                    config: TrainerConfig, ctx: DistributedContext, shares: list[list[int]]) -> CheckpointState:
    """Restore model, optimizer and RNG from ``out``'s checkpoint; returns its state (step, tokens)."""
    directory = checkpoint_directory(out)
    if directory is None:
        raise CircuitscopeError(f"--resume: {out} has no checkpoint; start without --resume")
    state = CheckpointState.model_validate_json((directory / STATE_FILE).read_text(encoding="utf-8"))
    _check_compatible(state, config, ctx, shares, directory)
    rank = ctx.rank if ctx.layer_sharded else 0
    tensors = {k: v.clone() for k, v in read_tensors(directory / _rank_file(rank)).items()}
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state.optimizer_groups})
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _check_compatible(state: CheckpointState, config: TrainerConfig, ctx: DistributedContext,
                      shares: list[list[int]], directory: Path) -> None:
    if state.format != CHECKPOINT_FORMAT or state.version > 1:
        raise CircuitscopeError(f"{directory} is not a checkpoint this circuitscope can read; start over with --force")
    current = config.identity()
    changed = sorted(k for k in set(state.settings) | set(current)
                     if k not in RESIZABLE and state.settings.get(k) != current.get(k))
    if changed:
        detail = ", ".join(f"{k}: {state.settings.get(k)!r} then, {current.get(k)!r} now" for k in changed)
        raise CircuitscopeError(
            f"--resume: the run in {directory.parent} was started with other settings ({detail}); "
            "pass the original settings, or start over with --force"
        )
    sharded_then = state.mode == "layers" and state.world_size > 1
    if (sharded_then or ctx.layer_sharded) and (state.layer_shares != shares or state.world_size != ctx.world_size):
        raise CircuitscopeError(
            f"--resume: the checkpoint was written by {state.world_size} process(es) sharding layers "
            f"{state.layer_shares}; resume it with the same number of processes and --distributed {state.mode}"
        )


def write_json(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
