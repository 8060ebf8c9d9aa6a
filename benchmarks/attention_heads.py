"""Annotating a graph's strongest cross-position edges with the attention heads that carry them (issue 15). Prints
its figures: the default graph (``circuitscope trace "The capital of France is"``: the real Gemma 3 270M and the
shipped dictionaries), its trace state rebuilt from the graph, the top ``--edges`` (500) cross-position edges
annotated with their top heads (one backward pass per distinct target), one QK attribution, and peak memory.

    OMP_NUM_THREADS=1 python benchmarks/attention_heads.py [--edges 500] [--prompt "..."]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edges", type=int, default=500)
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()

    from circuits.attention.heads import annotate_edges
    from circuits.attention.qk import AttentionQueries
    from circuits.attention.state import state_from_graph
    from circuits.tracing import trace
    from dictionaries.bundled import default_dictionaries_path
    from dictionaries.formats.registry import load_dictionaries
    from dictionaries.models.loading import load_model

    start = time.perf_counter()
    lm = load_model()
    dicts = load_dictionaries(default_dictionaries_path("gemma-3-270m"), dtype=lm.dtype)
    graph = trace(lm, dicts, args.prompt)
    print(f"trace         {time.perf_counter() - start:7.2f} s  ({graph.graph.number_of_nodes()} nodes, "
          f"{graph.graph.number_of_edges()} edges, {len(graph.metadata.tokens)} tokens)")
    start = time.perf_counter()
    state = state_from_graph(graph, lm, dicts)
    print(f"state         {time.perf_counter() - start:7.2f} s  (the prompt rerun, no rows)")
    start = time.perf_counter()
    routes = annotate_edges(state, graph, args.edges, n_heads=3)
    seconds = time.perf_counter() - start
    targets = len({r.target for r in routes})
    print(f"annotate      {seconds:7.2f} s  ({len(routes)} edges, {targets} targets: "
          f"{seconds / max(targets, 1):.3f} s per target)")
    worst = max(abs(r.recomputed - r.weight) / max(abs(r.weight), 1e-9) for r in routes)
    print(f"check         edges recomputed vs stored: max relative difference {worst:.2e}")
    first = routes[0]
    layer, head, share = first.heads[0]
    print(f"example       {first.source} -> {first.target} ({first.weight:+.3f}): "
          + ", ".join(f"L{L}.H{h} {s:+.3f}" for L, h, s in first.heads))
    start = time.perf_counter()
    queries = AttentionQueries(state)
    queries.attribute(layer, head, state.node(first.target).position, state.node(first.source).position)
    print(f"qk            {time.perf_counter() - start:7.2f} s  (one head, with the state's first-use recordings)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak memory   {peak / 1024:7.0f} MB")


if __name__ == "__main__":
    main()
