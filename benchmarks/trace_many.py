"""trace-many speed and memory on the real Gemma 3 270M with the shipped transcoders (issue 16's benchmark).

100 prompts of 6-20 tokens (the shipped two-group set, tests/data/two_groups_prompts.jsonl, and longer variants
of it) are traced by the same code as ``circuitscope trace-many`` (circuits.many.runner.trace_share), then
aggregated. Printed: loading time; total tracing time against the sum of the single traces' own times
(``metadata.timings['total']``: attribution + pruning, what one ``trace`` spends after loading), the ratio of
the two (target <= 1.15: no reloads, no repeated setup), prompts/minute, the RSS after every 10 prompts and the
peak RSS (flat = no growth over the run), and the aggregation time.

    python benchmarks/trace_many.py              # 100 prompts
    python benchmarks/trace_many.py --count 30 --out /tmp/many   # keep the folder
    python benchmarks/trace_many.py --out /tmp/many --aggregate-only   # time the aggregation of a kept folder
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHIPPED = Path(__file__).resolve().parents[1] / "tests" / "data" / "two_groups_prompts.jsonl"
PREFIXES = ["", "Here is a simple fact. ", "Answer in one word, please. ", "Everyone at school knows this: "]


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field in MB (VmRSS: all resident pages, the memory-mapped model's included;
    RssAnon: the process's own memory, which is what must stay flat over a run)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompts(count: int) -> list[dict]:
    base = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i in range(count):
        line = dict(base[i % len(base)])
        prefix = PREFIXES[(i // len(base)) % len(PREFIXES)]
        line.update(id=f"{line['id']}-{i}", prompt=prefix + line["prompt"])
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="Keep the run's folder here (default: a temporary one).")
    parser.add_argument("--aggregate-only", action="store_true", help="Only aggregate --out's graphs.")
    args = parser.parse_args()
    if args.aggregate_only:
        if args.out is None:
            parser.error("--aggregate-only needs --out")
        _aggregation(args.out)
        return
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        _run(args.count, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _run(args.count, Path(tmp))


def _aggregation(out: Path) -> None:
    """What ``trace-many`` does after the last prompt: the tables, summary.json and report.html."""
    from circuits.many.aggregate import aggregate
    from circuits.many.runner import read_index
    from viz.many_report import write_report

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    summary = aggregate(out)
    write_report(out, read_index(out), summary)
    aggregation = time.perf_counter() - start
    print(f"aggregation  {aggregation:.2f} s for {summary['n_done']} graphs")
    print(f"peak rss     {before:.0f} MB before aggregating, "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB after")


def _run(count: int, out: Path) -> None:
    """Trace ``count`` prompts into ``out`` as trace-many does (model and dictionaries loaded once), then
    aggregate."""
    from circuits.many.prompts import read_prompts
    from circuits.many.runner import trace_share, write_index
    from circuits.settings import TraceSettings
    from circuits.tracing import trace
    from cli.loading import load_model_and_dictionaries
    from dictionaries.labels import FeatureLabels
    from dictionaries.models.registry import DEFAULT_MODEL

    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts(count)))
    specs = read_prompts(out / "prompts.jsonl")
    start = time.perf_counter()
    loaded = load_model_and_dictionaries(DEFAULT_MODEL, None, "float32", None)
    labels = FeatureLabels.load(loaded.local)
    loading = time.perf_counter() - start
    lengths = [len(loaded.lm.tokenize(s.prompt)[0]) for s in specs]
    print(f"prompts      {len(specs)}, {min(lengths)}-{max(lengths)} tokens; loading {loading:.1f} s")
    single: list[float] = []

    def trace_one(prompt, settings):
        graph = trace(loaded.lm, loaded.dicts, prompt, settings, dictionaries_source=loaded.source,
                      labels=labels)
        single.append(graph.metadata.timings["total"])
        if len(single) % 10 == 0:
            print(f"rss          after {len(single):3d} prompts: {_status_mb('VmRSS'):.0f} MB, "
                  f"anonymous {_status_mb('RssAnon'):.0f} MB", flush=True)
        return graph

    start = time.perf_counter()
    failures = trace_share(specs, out, TraceSettings(), trace_one, progress=False)
    write_index(specs, out, TraceSettings())
    total = time.perf_counter() - start
    print(f"failed       {len(failures)}: {sorted(failures)[:5]}")
    print(f"tracing      {total:.1f} s total, sum of single traces {sum(single):.1f} s, "
          f"ratio {total / max(sum(single), 1e-9):.3f}")
    print(f"throughput   {60 * len(specs) / total:.1f} prompts/minute")
    _aggregation(out)


if __name__ == "__main__":
    main()
