"""One optimisation step: encode, decode every matryoshka prefix, losses, backward, Adam, bookkeeping.

Shapes: x, y [L, n, D] are this rank's share of the global batch of ``n_global`` tokens, already
normalised; L = layers this rank trains. Returns a :class:`StepMetrics` summed over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .distributed import DistributedContext
from .losses import FvuSums, auxk_loss, l0_penalty, reconstruction_loss
from .sparsity import FeatureCode, encode
from .trainable import TrainableDictionaries
from .trainer_config import TrainerConfig

BATCH_THRESHOLD_DECAY = 0.99


@dataclass
class StepMetrics:
    """Global metrics of one step. Per layer: fvu [L_all], l0 [L_all] (mean active features per token),
    dead [L_all] (dead features); scalars: loss parts; ``stop`` when any rank asked to stop."""

    fvu_sums: FvuSums
    l0: torch.Tensor
    dead: torch.Tensor
    reconstruction: float
    aux: float
    penalty: float
    stop: bool

    def loss(self, aux_coefficient: float) -> float:
        return self.reconstruction + aux_coefficient * self.aux + self.penalty


def learning_rate(config: TrainerConfig, step: int) -> float:
    """Linear warm-up, then constant, then linear decay to 0 over the last ``decay_fraction`` of steps."""
    total, warmup = config.total_steps, config.resolved_warmup()
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay_steps = config.decay_fraction * total
    if decay_steps > 0:
        factor *= min(1.0, (total - step) / decay_steps)
    return config.learning_rate * factor


def reconstruct(
    model: TrainableDictionaries, code: FeatureCode, x: torch.Tensor, sizes: list[int]
) -> list[torch.Tensor]:
    """Reconstructions [L, n, D] from each matryoshka prefix ``sizes`` (cumulative; last = full)."""
    outputs, partial, lo = [], model.base_output(x), 0
    for hi in sizes:
        partial = partial + code.decode(model, lo, hi)
        outputs.append(partial)
        lo = hi
    return outputs


def train_step(model: TrainableDictionaries, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               config: TrainerConfig, ctx: DistributedContext, layer_slots: list[int], n_layers_all: int,
               step: int, n_global: int, stop_requested: Callable[[], bool]) -> StepMetrics:
    """One step on this rank's share; ``layer_slots[i]`` = position of model layer i among all trained layers;
    ``stop_requested()`` is asked at the end of the step (every rank learns if any rank was asked to stop)."""
    dead = model.tokens_since_fired >= config.resolved_dead_after()
    use_aux = config.aux_coefficient > 0 and bool(dead.any())
    code = encode(model, x, config, ctx, dead if use_aux else None, config.resolved_aux_k(model.d_model), n_global)
    outputs = reconstruct(model, code, x, config.prefix_sizes)
    y_hat = outputs[-1]
    rec = reconstruction_loss(y, outputs, n_global)
    loss, aux_value, penalty_value = rec, torch.zeros(()), 0.0
    if use_aux:
        aux_value = auxk_loss(y - y_hat.detach(), model.decode_sparse(code.aux_values, code.aux_indices), ctx)
        loss = loss + config.aux_coefficient * aux_value
    if code.local_l0 is not None:
        global_l0 = ctx.sum_over_data(code.local_l0.detach().clone())
        penalty, penalty_value = l0_penalty(code.local_l0, global_l0, config.l0_coefficient or 1.0, config.target_l0)
        loss = loss + penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.sum_gradients(model.parameters())
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    optimizer.step()
    _bookkeeping(model, code, ctx, step, n_global)
    return _global_metrics(model, code, y, y_hat, ctx, layer_slots, n_layers_all, n_global,
                           (float(rec.detach()), float(aux_value.detach()), penalty_value), stop_requested(), config)


@torch.no_grad()
def _bookkeeping(
    model: TrainableDictionaries, code: FeatureCode, ctx: DistributedContext, step: int, n_global: int
) -> None:
    fired = ctx.sum_over_data(code.fired(model.width).float()) > 0
    model.tokens_since_fired.add_(n_global).masked_fill_(fired, 0)
    if code.threshold is not None:
        if step == 0:
            model.batch_threshold.copy_(code.threshold)
        else:
            model.batch_threshold.mul_(BATCH_THRESHOLD_DECAY).add_((1 - BATCH_THRESHOLD_DECAY) * code.threshold)


@torch.no_grad()
def _global_metrics(model, code, y, y_hat, ctx, slots, n_all, n_global, scalars, stop, config) -> StepMetrics:
    """Pack this rank's sums into full-size vectors, add them over all ranks once, unpack."""
    D = model.d_model
    local = FvuSums.zeros(model.n_layers, D)
    local.add(y, y_hat)
    replicated = ctx.is_main or not ctx.data_parallel  # values every data-parallel rank holds alike
    dead = (model.tokens_since_fired >= config.resolved_dead_after()).sum(-1).double() * float(replicated)
    index = torch.tensor(slots)
    full = torch.zeros(4, n_all, dtype=torch.float64)
    full[0, index], full[1, index], full[2, index], full[3, index] = local.sse, local.sum_y2, code.active_counts(), dead
    sum_y = torch.zeros(n_all, D, dtype=torch.float64)
    sum_y[index] = local.sum_y
    extra = torch.tensor([scalars[0], scalars[1], scalars[2] * float(replicated), float(stop)],
                         dtype=torch.float64)
    packed = ctx.sum_over_all(torch.cat([full.reshape(-1), sum_y.reshape(-1), extra]))
    full = packed[: 4 * n_all].view(4, n_all)
    sums = FvuSums(full[0], packed[4 * n_all : 4 * n_all + n_all * D].view(n_all, D), full[1], n_global)
    rec, aux, penalty, stop_votes = packed[-4:].tolist()
    return StepMetrics(sums, full[2] / n_global, full[3], rec, aux, penalty, stop_votes > 0)
