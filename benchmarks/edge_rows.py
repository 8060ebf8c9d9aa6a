"""How edge_rows reads each layer's sources from gradient rows (issue 17, bottleneck 1). Prints its figures.

1. ``groups``: synthetic ``_PositionGroups`` inputs shaped like a 1,024-token trace with 16k-wide Gemma Scope 2-like
   dictionaries on 18 layers (d = 640): per position and layer a log-normal number of active features (median 20)
   plus its error node, and at one position per layer ``--max`` (470) features, like an encoder firing heavily on
   an unusual token. Per layer: the bytes of every tensor the groups hold, the time to build them and the time to
   read one batch of ``--batch`` gradient rows [B, P, d] into a row buffer [B, sources] (``--device cuda``: on a
   GPU). Layers are built and read one at a time (summed), so that the old padded layout (~1.2 GB per layer) can
   be measured on a small machine.
2. ``trace``: one whole trace on a tiny random Gemma 3 (tests/conftest.py; 4 layers, d 32) with 64-wide
   dictionaries on a 49-token prompt (the tiny model takes 64): the attribution time, best of ``--repeat``.

Wall times are the best of ``--repeat``; so are the CPU times (process time, less disturbed by other processes on a
shared machine). Compare two checkouts side by side, with one thread each:

    OMP_NUM_THREADS=1 python benchmarks/edge_rows.py                       # this checkout
    OMP_NUM_THREADS=1 python benchmarks/edge_rows.py --repo /path/to/other # the same cases on another checkout
    python benchmarks/edge_rows.py --case groups --tokens 512              # one case, another size
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 1 << 30


def skewed_counts(tokens: int, median: float, max_count: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Sources per position [tokens]: log-normal features (median ``median``), one error each, and one position
    with ``max_count`` features."""
    counts = (median * torch.exp(sigma * torch.randn(tokens, generator=gen))).round().long().clamp(0, max_count)
    counts[torch.randint(tokens, (1,), generator=gen)] = max_count
    return counts + 1


def stored_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from ``obj`` through attributes and lists (each counted once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(stored_bytes(item, seen) for item in obj)
    if hasattr(obj, "__dict__"):
        return sum(stored_bytes(value, seen) for value in vars(obj).values())
    return 0


def groups_case(args) -> dict:
    from circuits.engine.edge_rows import _PositionGroups

    gen = torch.Generator().manual_seed(0)
    counts = [skewed_counts(args.tokens, args.median, args.max, args.sigma, gen) for _ in range(args.layers)]
    n_sources = sum(int(c.sum()) for c in counts)
    device = torch.device(args.device)
    grad = torch.randn(args.batch, args.tokens, args.d, generator=gen).to(device)
    out = torch.zeros(args.batch, n_sources, device=device)
    held = real = build = read = read_cpu = 0.0
    offset = 0
    for layer_counts in counts:
        n = int(layer_counts.sum())
        positions = torch.repeat_interleave(torch.arange(args.tokens), layer_counts)
        shuffle = torch.randperm(n, generator=gen)
        nodes, positions = offset + shuffle, positions[shuffle]
        vectors = torch.randn(n, args.d, generator=gen)
        nodes, positions, vectors = nodes.to(device), positions.to(device), vectors.to(device)
        offset += n
        _sync(device)
        start = time.perf_counter()
        groups = _PositionGroups(nodes, positions, vectors, args.tokens)
        _sync(device)
        build += time.perf_counter() - start
        held += stored_bytes(groups)
        real += vectors.numel() * 4 + nodes.numel() * 8
        best = best_cpu = float("inf")
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            groups.read(grad, out)
            _sync(device)
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - start_cpu)
        read += best
        read_cpu += best_cpu
        del groups, vectors
    all_counts = torch.cat(counts) - 1
    return {
        "case": "groups",
        "tokens": args.tokens,
        "layers": args.layers,
        "d": args.d,
        "batch": args.batch,
        "features_per_position": {"median": int(all_counts.median()), "max": int(all_counts.max()),
                                  "mean": round(float(all_counts.float().mean()), 1)},
        "sources": n_sources,
        "real_gib": round(real / GIB, 3),
        "stored_gib": round(held / GIB, 3),
        "stored_over_real": round(held / real, 2),
        "build_s": round(build, 3),
        "read_batch_s": round(read, 3),
        "read_batch_cpu_s": round(read_cpu, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
        **({"peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2)} if device.type == "cuda" else {}),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TRACE_PROMPT = " ".join(["the cat was in the tree and the dog was by the river in the city"] * 3)


def trace_case(args) -> dict:
    sys.path.insert(0, str(Path(args.repo or Path(__file__).resolve().parents[1]) / "tests"))
    from conftest import make_tiny_checkpoint
    from test_attribution_edges import make_dictionaries

    from circuits.engine.attribution import attribute
    from circuits.settings import TraceSettings
    from dictionaries.models.loading import load_model

    with tempfile.TemporaryDirectory() as directory:
        lm = load_model(make_tiny_checkpoint(Path(directory)))
    dicts = make_dictionaries(lm, width=64)
    settings = TraceSettings(batch_size=16)
    best = best_cpu = float("inf")
    for _ in range(args.repeat + 1):  # the first one warms up
        torch.manual_seed(0)
        start_cpu = time.process_time()
        result = attribute(lm, dicts, TRACE_PROMPT, settings)
        best = min(best, result.timings["attribution"])
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return {
        "case": "trace",
        "tokens": int(result.input_ids.shape[0]),
        "active_features": result.n_features,
        "edges": sum(block.values.numel() for block in result.blocks),
        "attribution_s": round(best, 4),
        "trace_cpu_s": round(best_cpu, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["groups", "trace"], help="one case (default: both)")
    parser.add_argument("--repo", help="import circuits from this checkout instead of this one")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--d", type=int, default=640)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--median", type=float, default=20.0)
    parser.add_argument("--max", type=int, default=470)
    parser.add_argument("--sigma", type=float, default=0.5, help="spread of the log-normal feature counts")
    parser.add_argument("--device", default="cpu", help="groups case: where the tensors live (cpu, cuda)")
    parser.add_argument("--repeat", type=int, default=2, help="reads (trace: traces) per measurement, best kept")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.repo or Path(__file__).resolve().parents[1]).resolve()))
    for case in [args.case] if args.case else ["groups", "trace"]:
        print(json.dumps((groups_case if case == "groups" else trace_case)(args)), flush=True)


if __name__ == "__main__":
    main()
