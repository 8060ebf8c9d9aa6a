"""Training speed on the real Gemma 3 270M: skip transcoders of width 4096, TopK k=32, all 18 layers.

Prints tokens per second for sampling text from the model (the offline default data), for harvesting
activations (one forward pass for all layers), and for training steps, and the held-out FVU, L0, dead
fraction and spliced CE/KL change after a fixed token budget. CPU only; timings depend on the machine.

The training text is Python's own documentation (``pydoc_data.topics``, ~100k tokens, shipped with
Python), so that the budget is not spent sampling; model samples are timed separately.

    PYTHONPATH=. python benchmarks/training.py [--tokens 65536] [--batch-tokens 1024] [--out DIR]

Measured on the project machine (2 AMD EPYC cores, AVX-512, float32, shared with other work: load ~1.4):
sampling 79 tok/s (batch 32), harvesting 641 tok/s, training 471 tok/s (18 skip transcoders 4096 wide,
TopK 32, batches of 1024, AuxK k 128), 257 tok/s end to end; after 65,536 tokens the held-out FVU is
0.44 (0.39-0.69 per layer) and splicing all 18 layers at once raises the cross-entropy by 1.45 nats
(3.62 -> 5.07, KL 1.83).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import dictionaries.training.harvest as harvest_module
import dictionaries.training.trainer as trainer_module
from dictionaries.evaluation import evaluate, format_report
from dictionaries.models.loading import load_model
from dictionaries.training import make_config, train
from dictionaries.training.data import (
    open_context_source,
    parse_data_spec,
    sample_from_model,
)


def _timed(function, totals: dict, key: str, tokens_of):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        totals[key] += time.perf_counter() - start
        totals[key + "_tokens"] += tokens_of(args, result)
        return result

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536, help="training token budget")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=2032)
    parser.add_argument("--sample-contexts", type=int, default=32, help="contexts sampled to time sampling")
    parser.add_argument("--out", default=None, help="keep the trained dictionaries here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="circuitscope-bench-"))
    text = work / "pydoc.txt"
    import pydoc_data.topics

    text.write_text("\n\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
    start = time.perf_counter()
    lm = load_model()
    print(f"model        {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, threads {torch.get_num_threads()} "
          f"(loaded in {time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    sample_from_model(lm, args.sample_contexts, 128, seed=0)
    sampled = args.sample_contexts * 127
    print(f"sampling     {sampled / (time.perf_counter() - start):8.0f} tok/s  ({sampled} tokens from the model, "
          f"batch {args.sample_contexts}, KV cache)")

    totals = {"harvest": 0.0, "harvest_tokens": 0, "step": 0.0, "step_tokens": 0}
    harvest_module.harvest = _timed(harvest_module.harvest, totals, "harvest",
                                    lambda a, r: r.shape[2])
    trainer_module.train_step = _timed(trainer_module.train_step, totals, "step",
                                       lambda a, r: a[2].shape[1])
    out = Path(args.out) if args.out else work / "skip-transcoders"
    config = make_config(
        kind="skip-transcoder", width=4096, activation="topk", k=32, tokens=args.tokens, data=str(text),
        batch_tokens=args.batch_tokens, buffer_batches=max(1, 16384 // args.batch_tokens), out=out,
        checkpoint_every=10**9, force=True, progress=True,
    )
    start = time.perf_counter()
    result = train(config, lm)
    wall = time.perf_counter() - start
    print(f"harvesting   {totals['harvest_tokens'] / totals['harvest']:8.0f} tok/s  "
          f"({totals['harvest_tokens']} tokens, all {lm.n_layers} layers in one pass, batch {config.harvest_batch})")
    print(f"training     {totals['step_tokens'] / totals['step']:8.0f} tok/s  "
          f"({totals['step_tokens']} tokens, {config.total_steps} steps of {config.batch_tokens}, "
          f"lr {config.learning_rate:.2e})")
    print(f"end to end   {result.tokens_seen / wall:8.0f} tok/s  ({wall:.0f} s)")

    source = open_context_source(parse_data_spec(str(text)), lm, 128, "heldout", 0)
    contexts = source.contexts(0, max(1, args.eval_tokens // 127))
    start = time.perf_counter()
    report = evaluate(result.dictionaries, lm, contexts, batch_size=2, data="pydoc (held out)")
    print(f"evaluation   {report.tokens / (time.perf_counter() - start):8.0f} tok/s  "
          "(clean + spliced forward with logits)")
    print(f"after {result.tokens_seen} training tokens, held out:")
    print(format_report(report))
    (work / "report.json").write_text(json.dumps(report.model_dump(), indent=2))
    print(f"report       {work / 'report.json'}")


if __name__ == "__main__":
    main()
