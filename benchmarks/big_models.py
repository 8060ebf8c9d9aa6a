"""Tracing a Gemma 3 1B-shaped model: time and peak memory (issue 13, "Bigger models"). Prints a table.

The model has the 1B's published shape from the registry (26 layers, d_model 1152, 4 heads of 256, 1 kv head,
d_mlp 6912, vocabulary 262,144), random weights, and the real Gemma 3 tokenizer (the default 270M checkpoint's,
which the 1B shares). The dictionaries are per-layer JumpReLU skip transcoders of width 16,384 with random
weights, thresholds calibrated to ~40 active features per token per layer (benchmarks/attribution.py's
``calibrated_transcoders``). Cases: "The capital of France is" (6 tokens) without a budget, and the 33-token prompt
of benchmarks/attribution.py with a 7,500-feature budget. Each case runs in a fresh process after a warm-up trace;
the parent reads that process's peak RSS and CPU time with ``os.wait4``, as /usr/bin/time does, and the case itself
reports the trace's own time and the plan's estimates.

    OMP_NUM_THREADS=1 python benchmarks/big_models.py            # every case, one table
    python benchmarks/big_models.py --case 6                     # one case in this process (a JSON line)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribution import PROMPTS, calibrated_transcoders  # benchmarks/attribution.py

WIDTH = 16_384
CASES = {"6": ("6", None), "33-budget": ("33", 7500)}
COLUMNS = [("case", "case"), ("tokens", "tokens"), ("batch", "batch"), ("active", "active_features"),
           ("expanded", "expanded"), ("trace s", "seconds"), ("trace CPU s", "trace_cpu_s"), ("forward s", "forward_s"),
           ("rows s", "rows_s"), ("plan s", "plan_seconds"), ("model+dicts GB", "rss_after_setup_gb"),
           ("peak RSS GB", "peak_rss_gb"), ("plan peak GB", "plan_peak_gb"), ("process s", "process_s"),
           ("CPU s", "cpu_s")]


def random_model(size_name: str = "1b", seed: int = 0):
    """A LoadedModel with registry size ``size_name``'s shape, random weights (linear and embedding rows
    ~ N(0, 1/fan_in), norm gains 1 + N(0, 0.1^2)) and the default checkpoint's Gemma 3 tokenizer."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.initialization import no_init_weights

    from dictionaries.models.default_model import ensure_default_checkpoint
    from dictionaries.models.loading import wrap_model
    from dictionaries.models.registry import GEMMA3

    torch.set_flush_denormal(True)  # as load_model does
    size = GEMMA3.size(size_name)
    config = Gemma3TextConfig(**size.text_config_values())
    config._attn_implementation = "eager"  # load_model's CPU default
    with no_init_weights():
        model = Gemma3ForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1 if "norm" in name else param.shape[-1] ** -0.5, generator=generator)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_checkpoint())
    return wrap_model(model, tokenizer, GEMMA3, f"gemma-3-{size_name} (random weights)")


def run_case(case: str, batch_size: int) -> dict:
    from circuits.engine.attribution import attribute
    from circuits.settings import TraceSettings

    lm = random_model()
    dicts = calibrated_transcoders(lm, width=WIDTH, skip=True)
    prompt_key, budget = CASES[case]
    settings = TraceSettings(max_features=budget, batch_size=batch_size)
    attribute(lm, dicts, "Warm up", settings)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    start, cpu_start = time.perf_counter(), time.process_time()
    result = attribute(lm, dicts, PROMPTS[prompt_key], settings)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "case": case,
        "tokens": int(result.input_ids.shape[0]),
        "active_features": result.n_features,
        "expanded": int(result.expanded.sum()),
        "seconds": round(elapsed, 1),
        "trace_cpu_s": round(cpu, 1),  # below "seconds" when other processes share the cores
        "forward_s": round(result.timings["forward"], 1),
        "rows_s": round(result.timings["attribution"], 1),
        "plan_seconds": round(result.plan.seconds, 1),
        "batch": result.plan.batch_size,
        "rss_after_setup_gb": round(rss_setup, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "plan_peak_gb": round(result.plan.peak_bytes / 1e9, 2),
        "edges_stored": sum(block.values.numel() for block in result.blocks),
    }


def measure(case: str, batch_size: int) -> dict:
    """Run one case in a child process; its own figures plus the child's wall time, CPU time and peak RSS."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--case", case, "--batch-size", str(batch_size)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # reaps the child: Popen.wait would lose its rusage
    child.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        return {"case": case, "error": output[-2000:]}
    figures = json.loads(lines[-1])
    figures["process_s"] = round(time.perf_counter() - start, 1)
    figures["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    figures["peak_rss_gb"] = round(usage.ru_maxrss / 1e6, 2)  # the child's peak as wait4 reports it (KB)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.batch_size)))
        return
    print(f"Gemma 3 1B shape, random weights; width-{WIDTH:,} skip transcoders; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, batch size {args.batch_size}")
    print(" | ".join(title for title, _ in COLUMNS), flush=True)
    for case in CASES:
        figures = measure(case, args.batch_size)
        if "error" in figures:
            print(f"{case}: failed\n{figures['error']}", flush=True)
            continue
        print(" | ".join(str(figures.get(key, "")) for _, key in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
