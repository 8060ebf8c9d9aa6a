"""Remainder folding and pruning on synthetic adjacencies shaped like a budgeted trace (issue 17). Prints its figures.

Setting: 18 layers; 100 to 140 (mean 120) active features per token per layer; errors at every position but the
first; a budget of 7,500 expanded features (chosen at random), every other active feature folded into its
(layer, position) remainder; 10 logit rows over all sources. Feature rows are batched as attribution makes them:
batches of 128 rows sorted by position, one block per layer of a batch, each row over its layer's source prefix,
non-zero only at sources up to its target's position. Timed: ``fold`` (grouping, folding, the folded-away mask),
``remainder_influence`` and ``prune`` at the default thresholds (0.8, 0.98), for the code before issue 17 (read
with ``git show`` from the commit named below) and for the current code, each in a fresh process so that its peak
RSS is its own.

Rows stored: all 7,500 at 33 tokens (float32, ~1 GB); at 256 and 512 tokens 1,500 and 750 of the expanded features
get rows (bfloat16, as the plan stores rows that would not fit in float32, ~0.8 GB each): every expanded feature's
row would be ~4 GB and ~8 GB. Group counts are the real ones (18 x tokens); the old folding's cost is groups x
blocks, so it is lower here than with all 7,500 rows.

    python benchmarks/pruning.py                       # every case, old and new
    python benchmarks/pruning.py --case 33 --code new  # one run in this process
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEFORE = "9a3efe8d23aeefa94d911ecba1b9ca67694dc49c"  # the last commit with the loop over groups
N_LAYERS, ACTIVE, BUDGET, N_LOGITS, BATCH = 18, 120, 7500, 10, 128
CASES = {"33": (33, 7500, "float32"), "256": (256, 1500, "bfloat16"), "512": (512, 750, "bfloat16")}


def pruning_before():
    """circuits.engine.pruning as it was at ``BEFORE``, imported as circuits.engine._pruning_before."""
    source = subprocess.run(["git", "show", f"{BEFORE}:circuits/engine/pruning.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "pruning_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("circuits.engine._pruning_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synthetic_trace(n_positions: int, n_rows: int, dtype, seed: int = 0):
    """(layout, features, expanded, blocks, weights) shaped like a budgeted trace (see the module docstring)."""
    import torch

    from circuits.engine.edge_rows import RowBlock
    from circuits.engine.node_layout import build_layout
    from circuits.engine.replacement import ActiveFeatures

    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(ACTIVE - 20, ACTIVE + 21, (N_LAYERS, n_positions), generator=g).flatten()
    layer = torch.arange(N_LAYERS).repeat_interleave(n_positions).repeat_interleave(counts)
    position = torch.arange(n_positions).repeat(N_LAYERS).repeat_interleave(counts)
    n = len(layer)
    features = ActiveFeatures(layer, position, torch.randint(0, 16384, (n,), generator=g), torch.rand(n, generator=g))
    error_positions = torch.ones(n_positions, dtype=torch.bool)
    error_positions[0] = False
    layout = build_layout(features, N_LAYERS, error_positions, N_LOGITS, n_positions - 1)
    chosen = torch.randperm(n, generator=g)[:BUDGET]
    expanded = torch.zeros(n, dtype=torch.bool)
    expanded[chosen] = True
    targets = layout.target_nodes

    def rows(ids, width):
        reach = layout.position[:width][None, :] <= layout.position[targets[ids]][:, None]
        return (torch.randn(len(ids), width, generator=g) * reach).to(dtype)

    logit_ids = torch.arange(n, n + N_LOGITS)
    blocks = [RowBlock(logit_ids, rows(logit_ids, layout.n_sources))]
    with_rows = chosen[:n_rows]
    for batch in with_rows.split(BATCH):
        batch = batch[torch.argsort(position[batch], stable=True)]
        for target_layer in layer[batch].unique().tolist():
            ids = batch[layer[batch] == target_layer]
            blocks.append(RowBlock(ids, rows(ids, layout.prefix_end(target_layer))))
    weights = torch.softmax(torch.randn(N_LOGITS, generator=g), 0)
    return layout, features, expanded, blocks, weights


class Clock:
    """Wall and CPU seconds since the last lap (CPU time: this process's, steady when other work shares the cores)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        lap = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return lap


def _rss_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def run_case(case: str, code: str) -> dict:
    import torch

    from circuits.engine.influence import node_influence

    n_positions, n_rows, dtype = CASES[case]
    layout, f, expanded, blocks, weights = synthetic_trace(n_positions, n_rows, getattr(torch, dtype))
    influence = node_influence(blocks, layout, weights)
    rss_before = _rss_gb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
    timings = {}
    clock = Clock()
    if code == "old":
        pruning = pruning_before()
        groups = pruning.fold_remainders(blocks, layout, f.layer, f.position, expanded)
        folded_away = torch.zeros(layout.n_nodes, dtype=torch.bool)  # as circuits/tracing.py did
        for group in groups:
            folded_away[layout.feature_node[group.features[1:]]] = True
    else:
        from circuits.engine import pruning

        remainders = pruning.Remainders(layout, f.layer, f.position, expanded)
        remainders.fold(blocks)
        groups, folded_away = remainders.groups, remainders.folded_away(layout.n_nodes)
    timings["fold"] = clock.lap()
    chosen = pruning.remainder_influence(influence, layout, groups)
    timings["remainder_influence"] = clock.lap()
    pruned = pruning.prune(blocks, layout, weights, 0.8, 0.98, folded_away, influence=chosen)
    timings["prune"] = clock.lap()
    return {
        "case": case, "code": code, "tokens": n_positions, "active_features": len(f.layer), "groups": len(groups),
        "blocks": len(blocks), "rows": sum(len(b.rows) for b in blocks), "storage": dtype,
        "edges_stored": sum(b.values.numel() for b in blocks),
        **{f"{k}_{unit}": round(v[i], 3) for k, v in timings.items() for i, unit in enumerate(["s", "cpu_s"])},
        "rss_before_gb": round(rss_before, 2), "peak_rss_gb": round(_rss_gb("VmHWM"), 2),
        "kept_nodes": int(pruned.node_mask.sum()), "kept_edges": sum(int((b.values != 0).sum()) for b in pruned.blocks),
        "kept_edge_weight_sum": round(sum(float(b.values.double().abs().sum()) for b in pruned.blocks), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    parser.add_argument("--code", choices=["old", "new"], default="new")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.code)))
        return
    for case in CASES:
        for code in ("old", "new"):
            out = subprocess.run([sys.executable, __file__, "--case", case, "--code", code],
                                 capture_output=True, text=True, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            print(lines[-1] if lines else f"{case} {code}: failed\n{out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
