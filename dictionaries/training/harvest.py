"""Activations for training: harvested from the model in one pass for all layers, shuffled in blocks,
optionally cached on disk as safetensors shards.

Harvesting runs each context batch [B, S] through the model once (``record_mlp_io``, stopping before
the unembedding) and keeps, for the trained layers, the transcoder input and MLP output of positions
1..S-1 (the BOS position is left out): [2, L, B * (S - 1), D] float32, index 0 = inputs, 1 = outputs.

The shuffling buffer works in blocks: block ``b`` is the next ``contexts_per_block`` training contexts,
harvested together; a permutation seeded by (seed, b) shuffles its tokens and its first
``batch_tokens * buffer_batches`` of them form that many batches. Every batch is therefore a pure
function of (seed, step), so a resumed run re-harvests (or re-reads) its block and continues exactly.

The cache (``--cache DIR``) holds block ``b`` unshuffled as ``block_{b}.safetensors`` plus a
``manifest.json`` naming what it was harvested from; a later run with the same manifest reads the
shards instead of running the model, and a different one is refused with a clear message.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..atomic_output import write_text_atomic
from ..errors import CircuitscopeError
from ..models.hook_sites import record_mlp_io
from ..models.loading import LoadedModel
from ..safetensors_io import read_tensors, write_tensors
from .data import ContextSource, derive_seed
from .distributed import DistributedContext

CACHE_FORMAT = "circuitscope.activation-cache"


@torch.no_grad()
def harvest(lm: LoadedModel, contexts: torch.Tensor, layers: list[int], batch_size: int) -> torch.Tensor:
    """contexts [C, S] -> activations [2, len(layers), C * (S - 1), D] float32 (inputs, outputs; no BOS)."""
    pieces = []
    for chunk in contexts.split(batch_size):
        rec = record_mlp_io(lm, chunk, with_logits=False)
        both = torch.stack([rec.inputs[layers], rec.outputs[layers]])[:, :, :, 1:]  # [2, L, B, S-1, D]
        pieces.append(both.reshape(2, len(layers), -1, both.shape[-1]).float().cpu())
    if not pieces:
        return torch.zeros(2, len(layers), 0, lm.d_model)
    return torch.cat(pieces, dim=2)


def block_permutation(seed: int, block: int, n_tokens: int, keep: int) -> torch.Tensor:
    """The first ``keep`` indices of a permutation of ``n_tokens``, seeded by (seed, block)."""
    generator = torch.Generator().manual_seed(derive_seed("shuffle", seed, block))
    return torch.randperm(n_tokens, generator=generator)[:keep]


class ShardCache:
    """Unshuffled blocks on disk, valid only for the harvest ``manifest`` they were written with."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        manifest = {"format": CACHE_FORMAT, "version": 1, **manifest}
        if path.is_file():
            existing = json.loads(path.read_text(encoding="utf-8"))
            if existing != manifest:
                changed = sorted(k for k in set(existing) | set(manifest) if existing.get(k) != manifest.get(k))
                raise CircuitscopeError(
                    f"--cache {self.directory} holds activations of another harvest (different {', '.join(changed)}); "
                    "use a new cache directory or delete this one"
                )
        self.manifest, self.path = manifest, path

    def shard(self, block: int) -> Path:
        return self.directory / f"block_{block}.safetensors"

    def read(self, block: int) -> torch.Tensor | None:
        if not self.shard(block).is_file():
            return None
        tensors = read_tensors(self.shard(block))
        return torch.stack([tensors["inputs"], tensors["outputs"]])

    def write(self, block: int, activations: torch.Tensor) -> None:
        if not self.path.is_file():
            write_text_atomic(self.path, json.dumps(self.manifest, indent=2) + "\n")
        write_tensors(self.shard(block), {"inputs": activations[0], "outputs": activations[1]})


class BlockSource:
    """Block ``b`` of activations for the layers this rank trains: [2, L_rank, n_tokens, D]."""

    def __init__(self, lm: LoadedModel, source: ContextSource, layers: list[int], shares: list[list[int]],
                 block_tokens: int, harvest_batch: int, ctx: DistributedContext, cache: ShardCache | None):
        self.lm, self.source, self.layers, self.shares = lm, source, layers, shares
        self.harvest_batch, self.ctx, self.cache = harvest_batch, ctx, cache
        self.contexts_per_block = math.ceil(block_tokens / (source.context_length - 1))
        self._current: tuple[int, torch.Tensor] | None = None

    def get(self, block: int) -> torch.Tensor:
        if self._current is None or self._current[0] != block:
            self._current = None  # free the previous block before harvesting the next
            self._current = (block, self._load(block))
        return self._current[1]

    def _load(self, block: int) -> torch.Tensor:
        if self.cache is not None:
            cached = self.cache.read(block)
            if cached is not None:
                return cached
        shares = self.ctx.context_shares(self.contexts_per_block)
        mine = shares[self.ctx.rank]
        start = block * self.contexts_per_block
        contexts = self.source.contexts(start + mine.start, len(mine)) if len(mine) else None
        local = (
            harvest(self.lm, contexts, self.layers, self.harvest_batch) if contexts is not None
            else torch.zeros(2, len(self.layers), 0, self.lm.d_model)
        )
        per_context = self.source.context_length - 1
        counts = [len(share) * per_context for share in shares]
        activations = self.ctx.exchange_block(local, counts, self.shares, self.layers)
        if self.cache is not None and self.ctx.is_main:
            self.cache.write(block, activations)
        return activations


def normalising_scales(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer scales s with mean ||s * v||^2 = D, from a block [2, L, N, D]: (in_scale [L], out_scale [L])."""
    mean_sq = activations.double().pow(2).sum(-1).mean(-1)  # [2, L]
    scales = (activations.shape[-1] / mean_sq.clamp_min(1e-12)).sqrt().float()
    return scales[0], scales[1]
