"""Attribution speed and memory on the real Gemma 3 270M (issue 3's benchmark). Prints its figures.

Setting: per-layer JumpReLU transcoders of width 4096 on all 18 layers, random weights with thresholds
calibrated so that about 40 features per token per layer are active; prompts of 6, 33 and 128 tokens,
without a feature budget and with a 7,500-feature budget. Each case runs in a fresh process so that its
peak RSS is its own.

    python benchmarks/attribution.py            # all cases
    python benchmarks/attribution.py --case 6   # one case: 6, 33, 33-budget, 128-budget
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTH = 4096
ACTIVE_PER_TOKEN = 40
PROMPTS = {
    "6": "The capital of France is",
    "33": (
        "In the old harbour town the fishermen mended their nets at dawn, while the baker on the corner sold "
        "warm bread and hot tea to the sailors who had come"
    ),
    "128": (
        "The history of the city began with a small settlement on the banks of the river, where traders from "
        "the north and the south met to exchange salt, wool and grain. Over the centuries the settlement grew "
        "into a market town with a stone bridge, a church and a town hall, and later into a busy port whose "
        "ships carried goods across the sea. In the nineteenth century the railway arrived, factories were "
        "built along the river, and the population doubled within a generation. Today the old town is a quiet "
        "place of narrow streets and museums, while the new districts on the hills are home to artists, "
        "students and young families who work in the"
    ),
}
# 128 tokens without a budget would store ~5e9 edges (~20 GB in float32): measured with the budget only.
CASES = {"6": ("6", None), "33": ("33", None), "33-budget": ("33", 7500), "128-budget": ("128", 7500)}


def calibrated_transcoders(lm, width: int = WIDTH, active: int = ACTIVE_PER_TOKEN, seed: int = 0, skip: bool = False):
    """Random per-layer JumpReLU transcoders (``skip``: skip transcoders) whose thresholds leave ``active``
    features on per token."""

    from dictionaries.assembly import random_dictionary_set
    from dictionaries.models.hook_sites import record_mlp_io

    dicts = random_dictionary_set(lm.n_layers, lm.d_model, width, skip=skip, seed=seed, model=lm.name)
    ids = lm.tokenize(PROMPTS["128"])
    inputs = record_mlp_io(lm, ids, with_logits=False).inputs[:, 0, 1:]  # BOS left out
    for layer in range(lm.n_layers):
        pre = dicts.pre_activations(layer, inputs[layer])
        k = pre.shape[0] * active
        threshold = pre.flatten().topk(k).values[-1].item()
        dicts.activation(layer).threshold.data.fill_(max(threshold, 0.0))
    return dicts


def run_case(case: str, batch_size: int) -> dict:
    import torch

    from circuits.engine.attribution import attribute
    from circuits.settings import TraceSettings
    from dictionaries.models.loading import load_model

    torch.manual_seed(0)
    lm = load_model()
    dicts = calibrated_transcoders(lm)
    prompt_key, budget = CASES[case]
    settings = TraceSettings(max_features=budget, batch_size=batch_size)
    attribute(lm, dicts, "Warm up", settings)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    start = time.perf_counter()
    result = attribute(lm, dicts, PROMPTS[prompt_key], settings)
    elapsed = time.perf_counter() - start
    return {
        "case": case,
        "tokens": int(result.input_ids.shape[0]),
        "active_features": result.n_features,
        "expanded": int(result.expanded.sum()),
        "seconds": round(elapsed, 2),
        "forward_s": round(result.timings["forward"], 2),
        "rows_s": round(result.timings["attribution"], 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "rss_after_model_gb": round(rss_before, 2),
        "edges_stored": sum(block.values.numel() for block in result.blocks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.batch_size)))
        return
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else f"{case}: failed\n{out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
