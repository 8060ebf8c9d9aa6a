"""The training loop: settings checked, activations harvested in shuffled blocks, steps, checkpoints, save.

``train(config)`` writes to ``config.out``:

- while running: ``checkpoint/`` (every ``checkpoint_every`` steps, on Ctrl-C / SIGTERM, and at
  ``stop_after_steps``), from which ``resume=True`` continues exactly;
- when finished: the native dictionary format (``config.json`` + ``layer_{L}.safetensors``, acting on raw
  activations: the normalisation is folded into the weights) and ``training.json`` (settings and final
  metrics); the checkpoint is then removed. A BatchTopK run is saved as JumpReLU with its calibrated
  threshold. The config's ``metadata`` names the trained layers (``"layers"``: a run on some ``layers``
  saves a set of that many layers), the data, context length and seed (``eval`` holds out from them).
"""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..assembly import build_dictionary_set
from ..atomic_output import atomic_directory
from ..config import ActivationConfig, DictionaryConfig
from ..dictionary_set import DictionarySet
from ..errors import CircuitscopeError
from ..formats.native import load_native, save_native
from ..models.loading import LoadedModel, load_model
from .checkpoint import (
    checkpoint_directory,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from .data import open_context_source, parse_data_spec
from .distributed import DistributedContext
from .harvest import BlockSource, ShardCache, block_permutation, normalising_scales
from .step import StepMetrics, train_step
from .trainable import TrainableDictionaries
from .trainer_config import TrainerConfig, check_before_work, is_run_directory


@dataclass
class TrainResult:
    """``finished`` is False when the run stopped early (``stop_after_steps``, Ctrl-C) with a checkpoint.
    ``dictionaries`` is the saved set (rank 0 of a finished run only)."""

    out: Path
    finished: bool
    step: int
    tokens_seen: int
    dictionaries: DictionarySet | None = None
    metrics: StepMetrics | None = None


def train(config: TrainerConfig, lm: LoadedModel | None = None) -> TrainResult:
    """Train the dictionaries ``config`` describes (``lm``: the already loaded ``config.model``, optional)."""
    n_layers, d_model = check_before_work(config)
    ctx = DistributedContext.from_environment(config.distributed)
    try:
        return _train(config, lm, ctx, n_layers, d_model)
    finally:
        ctx.close()


def _train(
    config: TrainerConfig, lm: LoadedModel | None, ctx: DistributedContext, n_layers: int, d_model: int
) -> TrainResult:
    out = Path(config.out)
    if ctx.data_parallel and config.batch_tokens % ctx.world_size:
        raise CircuitscopeError(
            f"--batch-tokens {config.batch_tokens} must be divisible by the {ctx.world_size} processes"
        )
    if ctx.layer_sharded and config.cache_dir is not None:
        raise CircuitscopeError("--cache works with one process or --distributed data, not with sharded layers")
    if config.resume and checkpoint_directory(out) is None and (out / "training.json").is_file():
        return TrainResult(out, True, config.total_steps, config.total_steps * config.batch_tokens, load_native(out))
    if config.force and ctx.is_main and is_run_directory(out):
        shutil.rmtree(out)
        out.mkdir(parents=True)
    ctx.barrier()

    lm = lm if lm is not None else load_model(config.model)
    layers = config.resolved_layers(n_layers)
    shares = ctx.layer_shares(layers)
    mine = shares[ctx.rank]
    source = open_context_source(parse_data_spec(config.data), lm, config.context_length, "train", config.seed)
    cache = None
    if config.cache_dir is not None:
        cache = ShardCache(config.cache_dir, {
            "model": config.model, "data": config.data, "seed": config.seed, "layers": layers,
            "context_length": config.context_length, "block_tokens": config.block_tokens,
        })
    blocks = BlockSource(lm, source, layers, shares, config.block_tokens, config.harvest_batch, ctx, cache)
    model = TrainableDictionaries(config, mine, d_model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, fused=True)  # fused: no temporaries
    step = tokens_seen = 0
    if config.resume:
        state = load_checkpoint(out, model, optimizer, config, ctx, shares)
        step, tokens_seen = state.step, state.tokens_seen
    else:
        _initialise(model, blocks.get(0), config)

    slots = [layers.index(layer) for layer in mine]
    total, B = config.total_steps, config.batch_tokens
    metrics: StepMetrics | None = None
    permutation: tuple[int, torch.Tensor] | None = None
    bar = tqdm(total=total * B, initial=step * B, unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not (config.progress and ctx.is_main), desc=f"training {config.kind}")
    with _stop_on_signals() as stop:
        while step < total:
            block, j = divmod(step, config.buffer_batches)
            activations = blocks.get(block)
            if permutation is None or permutation[0] != block:
                permutation = (block, block_permutation(config.seed, block, activations.shape[2], config.block_tokens))
            rows = permutation[1][j * B : (j + 1) * B][ctx.batch_slice(B)]
            x = activations[0][:, rows] * model.in_scale.view(-1, 1, 1)
            y = activations[1][:, rows] * model.out_scale.view(-1, 1, 1)
            metrics = train_step(model, optimizer, x, y, config, ctx, slots, len(layers), step, B,
                                 lambda: stop.requested)
            step, tokens_seen = step + 1, tokens_seen + B
            bar.update(B)
            bar.set_postfix(_postfix(metrics, config), refresh=False)
            halt = metrics.stop or (config.stop_after_steps is not None and step >= config.stop_after_steps)
            if step < total and (halt or step % config.checkpoint_every == 0):
                save_checkpoint(out, model, optimizer, step, tokens_seen, config, ctx, shares)
            if halt and step < total:
                bar.close()
                return TrainResult(out, False, step, tokens_seen, metrics=metrics)
    bar.close()
    dictionaries = _collect(model, config, ctx, shares, layers, d_model)
    if ctx.is_main:
        _write_output(out, dictionaries, config, layers, step, tokens_seen, metrics)
    ctx.barrier()
    return TrainResult(out, True, step, tokens_seen, dictionaries if ctx.is_main else None, metrics)


@torch.no_grad()
def _initialise(model: TrainableDictionaries, block: torch.Tensor, config: TrainerConfig) -> None:
    """Normalising scales and b_dec (the mean target) from the first block [2, L, N, D]."""
    if config.normalize:
        in_scale, out_scale = normalising_scales(block)
        model.in_scale.copy_(in_scale)
        model.out_scale.copy_(out_scale)
    model.b_dec.copy_(block[1].double().mean(1).float() * model.out_scale.view(-1, 1))
    if model.log_threshold is not None and config.target_l0 is not None:
        # Start JumpReLU at its target: the threshold that keeps target_l0 features per token on average.
        sample = block[0][:, : config.batch_tokens] * model.in_scale.view(-1, 1, 1)
        z = model.pre_activations(sample).reshape(model.n_layers, -1)
        keep = max(1, round(config.target_l0 * sample.shape[1]))
        threshold = z.kthvalue(z.shape[1] - keep + 1, dim=1).values.clamp_min(1e-3)
        model.log_threshold.copy_(threshold.log().view(-1, 1).expand_as(model.log_threshold))


def _postfix(metrics: StepMetrics, config: TrainerConfig) -> dict[str, str]:
    total_features = metrics.dead.numel() * config.width
    return {
        "loss": f"{metrics.loss(config.aux_coefficient):.4g}",
        "fvu": f"{metrics.fvu_sums.total():.4f}",
        "l0": f"{float(metrics.l0.mean()):.1f}",
        "dead": f"{float(metrics.dead.sum()) / total_features:.3f}",
    }


def _collect(model: TrainableDictionaries, config: TrainerConfig, ctx: DistributedContext,
             shares: list[list[int]], layers: list[int], d_model: int) -> DictionarySet:
    """Every layer's folded tensors (from every rank) as a validated DictionarySet."""
    local = {layer: model.layer_tensors(i, config.activation) for i, layer in enumerate(model.layers)}
    example = next(iter(local.values()))
    template = {layer: {k: torch.empty_like(v) for k, v in example.items()} for layer in layers}
    tensors = ctx.broadcast_layers(local, shares, template)
    return trained_dictionary_set(config, [tensors[layer] for layer in layers], layers, d_model)


def trained_dictionary_set(config: TrainerConfig, layer_tensors: list[dict[str, torch.Tensor]], layers: list[int],
                           d_model: int) -> DictionarySet:
    """The validated set of folded per-layer tensors (``TrainableDictionaries.layer_tensors``) of ``layers``."""
    activation = (
        ActivationConfig(type="topk", k=config.k) if config.activation == "topk" else ActivationConfig(type="jumprelu")
    )
    metadata = {
        "layers": ",".join(map(str, layers)), "trained_activation": config.activation, "k": config.k,
        "target_l0": config.target_l0, "matryoshka": ",".join(map(str, config.matryoshka or [])) or None,
        "data": config.data, "context_length": config.context_length, "seed": config.seed, "tokens": config.tokens,
    }
    dconfig = DictionaryConfig(
        architecture=config.architecture, skip=config.has_skip, n_layers=len(layers), d_model=d_model,
        widths=[config.width] * len(layers), activation=activation, model=config.model, source_format="trained",
        metadata=metadata,
    )
    return build_dictionary_set(dconfig, layer_tensors, [f"<trained layer {layer}>" for layer in layers])


def _write_output(out: Path, dictionaries: DictionarySet, config: TrainerConfig, layers: list[int], step: int,
                  tokens_seen: int, metrics: StepMetrics | None) -> None:
    summary = {"settings": config.model_dump(mode="json"), "layers": layers, "steps": step, "tokens": tokens_seen}
    if metrics is not None:
        summary["last_batch"] = {
            "fvu": metrics.fvu_sums.per_layer().tolist(), "l0": metrics.l0.tolist(),
            "dead_fraction": (metrics.dead / config.width).tolist(), "fvu_total": metrics.fvu_sums.total(),
        }
    with atomic_directory(out, overwrite=True) as tmp:  # replaces the run directory, checkpoint included
        save_native(dictionaries, tmp, overwrite=True)
        write_json(tmp / "training.json", summary)


class _StopRequest:
    requested = False


@contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """The first Ctrl-C / SIGTERM asks for a checkpoint and a clean stop after the current step; a second
    Ctrl-C interrupts at once."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.requested = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
