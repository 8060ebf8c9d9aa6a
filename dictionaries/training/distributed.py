"""Several training processes (``torchrun``) with the gloo backend: data parallel, or layers sharded.

``torchrun --nproc_per_node R -m cli dictionaries train ...`` starts R processes; each calls
:meth:`DistributedContext.from_environment`. Both modes split the model forward passes of each block
of contexts across the ranks (rank r harvests the r-th contiguous share) and then exchange activations:

- ``data``: every rank receives the whole block (all layers), draws the same shuffled global batch and
  trains on its 1/R slice of it; gradients are summed (each rank's loss is already divided by the
  global token count), so every step equals the one-process step up to float summation order.
- ``layers``: rank r trains its contiguous share of the layers on every token of the batch and receives
  only those layers' activations. Per-layer dictionaries are independent, so this equals one process too.

With one process (no ``WORLD_SIZE`` > 1 in the environment) every collective is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CircuitscopeError
from .trainer_config import DistributedMode


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    mode: DistributedMode = "data"

    @classmethod
    def from_environment(cls, mode: DistributedMode) -> DistributedContext:
        """Join the torchrun process group (gloo) when ``WORLD_SIZE`` > 1, else a one-process context."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(0, 1, mode)
        if not dist.is_initialized():
            if not dist.is_gloo_available():
                raise CircuitscopeError("this torch build has no gloo backend; run one process (without torchrun)")
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size(), mode)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel(self) -> bool:
        return self.world_size > 1 and self.mode == "data"

    @property
    def layer_sharded(self) -> bool:
        return self.world_size > 1 and self.mode == "layers"

    # --- who does what -------------------------------------------------------------------------------
    def layer_shares(self, layers: list[int]) -> list[list[int]]:
        """The layers each rank trains (all of them on every rank unless layer-sharded)."""
        if not self.layer_sharded:
            return [list(layers)] * self.world_size
        if len(layers) < self.world_size:
            raise CircuitscopeError(
                f"{self.world_size} processes cannot share {len(layers)} layer(s); run at most {len(layers)} "
                "processes or use --distributed data"
            )
        return [chunk.tolist() for chunk in torch.tensor(layers).tensor_split(self.world_size)]

    def context_shares(self, count: int) -> list[range]:
        """Contiguous shares of ``count`` contexts, one per rank, for the forward passes."""
        bounds = [len(c) for c in torch.arange(count).tensor_split(self.world_size)]
        starts = [sum(bounds[:r]) for r in range(self.world_size)]
        return [range(s, s + n) for s, n in zip(starts, bounds, strict=True)]

    def batch_slice(self, batch_tokens: int) -> slice:
        """This rank's rows of a global batch (all of them unless data parallel)."""
        if not self.data_parallel:
            return slice(0, batch_tokens)
        share = batch_tokens // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    # --- collectives (no-ops for one process) --------------------------------------------------------
    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold different tokens of the batch (data parallel); in place."""
        if self.data_parallel:
            dist.all_reduce(tensor)
        return tensor

    def sum_over_all(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather_over_data(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate equal-shaped tensors of the data-parallel ranks along ``dim``."""
        if not self.data_parallel:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim)

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Data parallel: add up every rank's gradients (one flattened all-reduce)."""
        if not self.data_parallel:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def exchange_block(
        self, local: torch.Tensor, counts: list[int], shares: list[list[int]], layers: list[int]
    ) -> torch.Tensor:
        """Activations [2, len(layers), n_local, D] harvested here -> the whole block for this rank.

        ``counts[r]`` is rank r's token count. Data parallel: every rank gets [2, len(layers), sum(counts), D].
        Layer-sharded: rank r gets only its layers ``shares[r]``. One process: ``local`` itself.
        """
        if self.world_size == 1:
            return local
        longest = max(counts)
        padded = torch.zeros(*local.shape[:2], longest, local.shape[-1], dtype=local.dtype)
        padded[:, :, : local.shape[2]] = local
        if self.data_parallel:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
            return torch.cat([p[:, :, :n] for p, n in zip(parts, counts, strict=True)], dim=2)
        position = {layer: i for i, layer in enumerate(layers)}
        mine = None
        for destination, share in enumerate(shares):
            piece = padded[:, [position[layer] for layer in share]].contiguous()
            parts = [torch.empty_like(piece) for _ in range(self.world_size)] if destination == self.rank else None
            dist.gather(piece, parts, dst=destination)
            if parts is not None:
                mine = torch.cat([p[:, :, :n] for p, n in zip(parts, counts, strict=True)], dim=2)
        return mine  # type: ignore[return-value]

    def broadcast_layers(self, tensors: dict[int, dict[str, torch.Tensor]], shares: list[list[int]],
                         template: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
        """Layer-sharded: every rank gets every layer's tensors from the rank that trained it.

        ``tensors`` holds this rank's layers; ``template`` gives every layer's tensor shapes (empty tensors).
        """
        if not self.layer_sharded:
            return tensors
        out: dict[int, dict[str, torch.Tensor]] = {}
        for owner, share in enumerate(shares):
            for layer in share:
                parts = tensors[layer] if owner == self.rank else template[layer]
                for name in sorted(parts):
                    dist.broadcast(parts[name], src=owner)
                out[layer] = parts
        return out

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
