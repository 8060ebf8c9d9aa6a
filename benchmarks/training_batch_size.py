"""Batch size and learning rate on a fixed token budget: one skip transcoder (width 1024, TopK k=64) of one layer
of the real Gemma 3 270M, trained on the same Brown-corpus tokens with several (batch, lr) settings; prints the
held-out FVU of each.

The activations are harvested once into an activation cache (``--cache``), so every setting after the first
trains on the very same shuffled blocks (the block size is kept at 16,384 tokens) and costs seconds.

    PYTHONPATH=. python benchmarks/training_batch_size.py --data brown.jsonl [--layer 13] [--tokens 262144]

Measured on the project machine (2 cores), layer 13, 262,144 tokens, 16,510 held-out tokens, FVU:

    batch 4096 lr 8e-4 (the trainer's defaults at width 1024)  0.568
    batch 1024 lr 4e-4 0.521 | lr 8e-4 0.481 | lr 1.6e-3 0.452
    batch  512 lr 8e-4 0.455 | lr 1.6e-3 0.430 | lr 3.2e-3 0.430
    batch  256 lr 8e-4 0.434 | lr 1.6e-3 0.420
    batch  128 lr 8e-4 0.420

On a budget of a few million tokens the number of Adam steps limits quality more than gradient noise does: the
shipped set (tools/build_default_dictionaries.sh) is trained with batches of 256 at lr 1.6e-3. The same layer
after 2.0M tokens with the defaults (489 steps of 4096) reached 0.419 before its decoder refit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dictionaries.models.loading import load_model
from dictionaries.training import make_config, train
from dictionaries.training.data import open_context_source, parse_data_spec
from dictionaries.training.harvest import harvest

SETTINGS = [(4096, 8e-4), (1024, 4e-4), (1024, 8e-4), (1024, 1.6e-3), (512, 8e-4), (512, 1.6e-3), (512, 3.2e-3),
            (256, 8e-4), (256, 1.6e-3), (128, 8e-4)]
BLOCK_TOKENS = 16384


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training text (.txt/.jsonl), e.g. the Brown corpus")
    parser.add_argument("--layer", type=int, default=13)
    parser.add_argument("--tokens", type=int, default=262144, help="training tokens per setting")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--cache", default=None, help="activation cache directory (default: a temporary one)")
    args = parser.parse_args()

    lm = load_model()
    work = Path(tempfile.mkdtemp(prefix="circuitscope-batch-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    source = open_context_source(parse_data_spec(args.data), lm, 128, "heldout", 0)
    held_out = harvest(lm, source.contexts(0, max(1, args.eval_tokens // 127)), [args.layer], 8)[:, 0]
    x, y = held_out[0], held_out[1]  # [N, D] each
    variance = (y - y.mean(0)).pow(2).sum()
    print(f"layer {args.layer}, {args.tokens} training tokens, {x.shape[0]} held-out tokens, width 1024, TopK 64")
    for batch, lr in SETTINGS:
        config = make_config(
            kind="skip-transcoder", width=1024, activation="topk", k=64, layers=[args.layer], tokens=args.tokens,
            data=args.data, batch_tokens=batch, buffer_batches=BLOCK_TOKENS // batch, lr=lr, seed=0,
            out=work / f"b{batch}-lr{lr:g}", cache_dir=cache, checkpoint_every=10**9, progress=False,
        )
        start = time.perf_counter()
        result = train(config, lm)
        with torch.no_grad():
            error = (y - result.dictionaries[0](x)).pow(2).sum()
        print(f"batch {batch:>5}  lr {lr:<7g} steps {config.total_steps:>5}  held-out FVU {float(error / variance):.4f}"
              f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
