"""The plan of a trace: what the attribution will compute, how much memory and time it will take, and whether it
fits, decided after the forward pass and before any adjacency row is computed.

What is counted (bytes; P positions, d = d_model, N active features, S = sources = P + N + errors, B batch size):

    adjacency     sum over computed rows of the row's width (its source prefix) x 4         (float32 rows)
                  no budget: exact from the layout; a budget of K: K x the mean feature-row width (the rows chosen
                  by influence are not known in advance) + the logit rows
    batch         one batch of rows in flight: ~6 gradient-sized buffers [B, P, max(d, heads x head_dim)] and
                  the row buffer [B, S], x 4
    pruning       pruning copies the rows it keeps block by block, freeing each block as it goes, and scores one
                  block at a time in float32: ~3 blocks of [B, S] x 4; with keep_unpruned the rows stay for the
                  file, so up to the whole adjacency again
    (rows are computed and stored in float32, or in bfloat16: half the adjacency; see exact_edges.py, and
    attribution._plan for when ``auto`` takes bfloat16)
    already held  what the process holds now (model, dictionaries' resident copies, the clean run): RssAnon on a
                  CPU, torch.cuda.memory_allocated on a GPU; measured, not estimated

    peak = already held + adjacency + max(batch, pruning)

The memory this trace may use is the smallest of: the memory available now (MemAvailable on Linux, or a GPU's free
memory), the cgroup limit, and ``TraceSettings.memory_limit``. The batch size shrinks (down to 1) when a batch would
not fit; a trace whose peak would not fit is refused with the estimate and the flags that would fix it.

Time is estimated from a probe: one batch of rows of the top layer's features, spread over the prompt, is computed
(in the rows' precision) and timed, a short probe at its fastest of up to three runs; the cost of a row is taken as
proportional to the layers it passes through times the positions its batch spans. Ranking sweeps of a budgeted run
and pruning are estimated as passes over the adjacency at a measured memory bandwidth. Rows stored in bfloat16 are
recomputed in float32 for the targets pruning keeps (exact_edges.py); that time is bounded apart
(``recompute_seconds``) by every computed row at the rate of a float32 probe.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from dictionaries.errors import CircuitscopeError

from .heap import return_freed_memory
from .node_layout import NodeLayout

FLOAT = 4  # bytes of a float32
Storage = Literal["auto", "float32", "bfloat16"]
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_GRADIENT_BUFFERS = 6  # gradient rows and the attention backward's temporaries alive at once (see linear_backward)
_PRUNING_BLOCKS = 3  # blocks alive at once while pruning: the block, its kept copy, its float32 edge scores
_SAFETY = 0.9  # use at most this share of the memory available
_SWEEP_PASSES = 15  # passes over the adjacency: ranking sweeps (a budget) + influence, folding, pruning, scores


class TraceDoesNotFit(CircuitscopeError):
    """A trace whose estimated peak memory exceeds what it may use; the message holds the plan and the fixes."""


@dataclass(frozen=True)
class MemoryAvailable:
    bytes: int  # what the trace may still allocate
    source: str  # where the figure comes from


def parse_bytes(text: str) -> int:
    """``"8GB"``, ``"512 MiB"``, ``"1.5G"`` or a plain number of bytes -> bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise CircuitscopeError(f"cannot read the memory size {text!r}; write e.g. 8GB, 512MB or 1.5G")
    return int(float(match[1]) * 1024 ** "bkmgt".index(match[2] or "b"))


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _proc_field(path: str, name: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def memory_held(device: torch.device) -> int:
    """What this process holds now on ``device``: RssAnon on a CPU (memory-mapped files are not counted: the
    kernel can drop their pages), allocated memory on a GPU.

    On a CPU the allocator's freed heap is returned to the system first (:func:`return_freed_memory`): the forward
    pass and the plan's timing probe free a batch's temporaries just before this is read, and the rows reuse that
    memory, so counting it as held counted it twice (prune-256: held 1.39 GB read where 0.57 GB was live, and the
    estimate 32% above the measured peak)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return_freed_memory()
    return _proc_field("/proc/self/status", "RssAnon") or 0


def memory_available(device: torch.device, limit: int | None = None, held: int | None = None) -> MemoryAvailable:
    """What a trace may still allocate on ``device``: see the module docstring. ``limit`` caps the trace's
    whole footprint (what it holds now included); ``held``: :func:`memory_held`, when the caller has read it."""
    options: list[MemoryAvailable] = []
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        options.append(MemoryAvailable(int(free), "the GPU's free memory"))
    else:
        available = _proc_field("/proc/meminfo", "MemAvailable")
        if available is not None:
            options.append(MemoryAvailable(available, "MemAvailable"))
        room = _cgroup_room()
        if room is not None:
            options.append(MemoryAvailable(room, "the cgroup's memory.max"))
    if limit is not None:
        held = memory_held(device) if held is None else held
        options.append(MemoryAvailable(max(limit - held, 0), "--memory-limit"))
    if not options:
        return MemoryAvailable(1 << 62, "unknown (no limit)")
    best = min(options, key=lambda m: m.bytes)
    return MemoryAvailable(int(best.bytes * _SAFETY) if best.source != "--memory-limit" else best.bytes, best.source)


@dataclass(frozen=True)
class Calibration:
    """Measured speeds of this machine: seconds per (row x layer x position its batch spans) of attribution at the
    probe's batch size, and seconds per adjacency element of a pass over the rows (abs, sum, multiply)."""

    seconds_per_row_layer_position: float
    seconds_per_element: float


def bfloat16_speedup(device: torch.device, repeats: int = 5) -> float:
    """How many times faster a [1024, 640] x [640, 1024] matmul is in bfloat16 than in float32 here (the fastest of
    ``repeats`` each, so a busy machine does not decide it): ~3.7 on a CPU with AVX-512 BF16, below 1 on one
    without bfloat16 arithmetic."""
    def best(dtype: torch.dtype) -> float:
        a = torch.rand(1024, 640, device=device, dtype=dtype)
        b = torch.rand(640, 1024, device=device, dtype=dtype)
        fastest = float("inf")
        for _ in range(repeats + 1):  # the first warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            fastest = min(fastest, time.perf_counter() - start)
        return fastest

    return best(torch.float32) / best(torch.bfloat16)


def measure_bandwidth(device: torch.device, elements: int = 1 << 20, repeats: int = 5) -> float:
    """Seconds per float32 element of one ``abs().sum(1)`` pass (what influence and pruning do over the rows), the
    fastest of ``repeats`` passes over a 4 MB block (a few MB: the probe must not cost the memory it measures)."""
    x = torch.rand(256, elements // 256, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        x.abs().sum(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best / elements


@dataclass(frozen=True)
class TracePlan:
    n_positions: int
    n_layers: int
    n_features: int  # active features
    n_expanded: int  # feature rows to compute
    n_logits: int
    n_sources: int
    batch_size: int
    adjacency_bytes: int
    batch_bytes: int
    pruning_bytes: int
    held_bytes: int
    available: MemoryAvailable
    seconds: float
    budget_hint: int | None  # the largest feature budget that fits, when the plan does not
    storage: str = "float32"  # the dtype rows are stored in (see circuits.engine.exact_edges)
    recompute_seconds: float = 0.0  # at most this long recomputing the kept rows in float32 (rounded storage only)

    @property
    def peak_bytes(self) -> int:
        return self.held_bytes + self.adjacency_bytes + max(self.batch_bytes, self.pruning_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes - self.held_bytes <= self.available.bytes

    def describe(self) -> str:
        rows = f"{self.n_expanded:,} feature rows + {self.n_logits} logit rows"
        budget = "" if self.n_expanded == self.n_features else f" (a budget of {self.n_expanded:,})"
        return "\n".join([
            f"prompt          {self.n_positions} tokens, {self.n_layers} layers",
            f"active features {self.n_features:,}",
            f"rows to compute {rows}{budget}, over up to {self.n_sources:,} sources",
            f"batch size      {self.batch_size}, rows stored in {self.storage}",
            f"memory          peak {format_bytes(self.peak_bytes)} = held {format_bytes(self.held_bytes)} + "
            f"adjacency {format_bytes(self.adjacency_bytes)} + "
            f"max(batch {format_bytes(self.batch_bytes)}, pruning {format_bytes(self.pruning_bytes)})",
            f"may use         {format_bytes(self.available.bytes)} more ({self.available.source})",
            f"time            about {self.seconds:.0f} s for attribution and pruning" + (
                f", then up to {self.recompute_seconds:.0f} s recomputing the kept rows in float32 (exact edges; "
                "only the rows pruning keeps: 7-65% of this on the benchmarks)" if self.recompute_seconds else ""),
        ])

    def refusal(self) -> str:
        fixes = []
        if self.budget_hint:
            fixes.append(f"a feature budget (--max-features {self.budget_hint:,} fits)")
        fixes.append("a shorter prompt")
        fixes.append("a device or machine with more memory (--device)")
        fixes.append("a higher --memory-limit if the limit is yours")
        return (f"this trace needs about {format_bytes(self.peak_bytes - self.held_bytes)} more memory but may use "
                f"{format_bytes(self.available.bytes)} ({self.available.source}); nothing was attributed.\n"
                f"{self.describe()}\nfix it with: " + "; ".join(fixes))


def _row_widths(layout: NodeLayout, feature_layers: torch.Tensor) -> torch.Tensor:
    """Width [N] of each active feature's row (the sources below its layer)."""
    ends = torch.tensor([layout.prefix_end(layer) for layer in range(len(layout.layer_end))], dtype=torch.long)
    return ends[feature_layers.cpu()] if len(feature_layers) else torch.zeros(0, dtype=torch.long)


def _expanded_rows(n_features: int, n_expanded: int, ranking: torch.Tensor | None) -> torch.Tensor | None:
    """The feature rows expected to be computed: all (None) without a budget; with one, the first ``n_expanded``
    of ``ranking`` (the features by their direct influence on the logits, which a budget expands first), or
    None when no ranking is known."""
    if n_expanded >= n_features or ranking is None:
        return None
    return ranking[:n_expanded].cpu()


def _adjacency_bytes(widths: torch.Tensor, rows: torch.Tensor | None, n_expanded: int, n_logits: int,
                     n_sources: int, element: int) -> int:
    if n_expanded >= len(widths):
        feature_elements = int(widths.sum())
    elif rows is not None:  # the rows a budget is expected to pick
        feature_elements = int(widths[rows].sum())
    else:  # unknown: count the mean row
        feature_elements = int(float(widths.float().mean()) * n_expanded) if len(widths) else 0
    return (feature_elements + n_logits * n_sources) * element


def _row_work(feature_layers: torch.Tensor, feature_positions: torch.Tensor, rows: torch.Tensor | None,
              n_expanded: int, batch: int) -> float:
    """Sum over the computed rows of (layers passed) x (positions spanned): a row of layer l passes l + 1 layers,
    and a batch's gradient rows span the positions up to its latest target. Without a budget the batches are
    known (features in order); with one, ``rows`` are the expected ones, batched by position as the ranking
    windows are; unknown rows are taken as a sample of the features."""
    depth = feature_layers.cpu().float() + 1
    if len(depth) == 0:
        return 0.0
    positions = feature_positions.cpu()
    if n_expanded < len(depth):
        if rows is None:
            return float(depth.mean()) * n_expanded * float((positions + 1).float().mean())
        order = rows[torch.argsort(positions[rows], stable=True)]
        depth, positions = depth[order], positions[order]
    which = torch.arange(len(depth)) // batch
    span = torch.zeros(int(which[-1]) + 1, dtype=torch.long).scatter_reduce(0, which, positions + 1, "amax")
    return float((depth * span[which]).sum())


def make_plan(
    layout: NodeLayout,
    feature_layers: torch.Tensor,
    feature_positions: torch.Tensor,
    n_logits: int,
    d_model: int,
    head_width: int,
    max_batch: int,
    budget: int | None,
    device: torch.device,
    calibration: Calibration,
    memory_limit: int | None = None,
    storage: Storage = "auto",
    keep_unpruned: bool = False,
    ranking: torch.Tensor | None = None,
    exact_calibration: Calibration | None = None,
) -> TracePlan:
    """The plan for attributing ``layout``'s features (``feature_layers``, ``feature_positions`` [N] long) and
    ``n_logits`` logit rows.

    ``head_width`` is heads x head_dim; ``budget`` the feature budget (None: every feature); ``max_batch`` the
    batch size asked for. ``storage``: the dtype of the rows; "auto" is float32 when it fits and bfloat16 when
    only that fits. ``ranking`` [N] (optional): feature ids by their direct influence on the logits, the order a
    budget will roughly expand them in; the rows it counts are then the first ``budget`` of it.
    ``exact_calibration``: float32 speeds, for the recompute of kept rows when they are stored in bfloat16 (its
    bound: every computed row again at the float32 rate; pruning keeps fewer)."""
    n_features = len(feature_layers)
    n_expanded = n_features if budget is None else min(budget, n_features)
    P = int(layout.token_node.shape[0])
    n_sources = layout.n_sources
    widths = _row_widths(layout, feature_layers)
    held = memory_held(device)
    available = memory_available(device, memory_limit, held)
    per_row = (_GRADIENT_BUFFERS * P * max(d_model, head_width) + n_sources) * FLOAT

    def estimate(expanded: int, element: int) -> tuple[int, int, int]:
        rows = _expanded_rows(n_features, expanded, ranking)
        adjacency = _adjacency_bytes(widths, rows, expanded, n_logits, n_sources, element)
        room = available.bytes - adjacency
        batch = max(1, min(max_batch, room // per_row if room > 0 else 1))
        block_rows = max(int(batch), n_logits)  # a block holds one batch's rows of one layer (or the logit rows)
        pruning = _PRUNING_BLOCKS * block_rows * n_sources * FLOAT + (adjacency if keep_unpruned else 0)
        return adjacency, int(batch), pruning

    def fits(expanded: int, element: int) -> bool:
        adjacency, batch, pruning = estimate(expanded, element)
        return adjacency + max(batch * per_row, pruning) <= available.bytes

    if storage == "auto":
        storage = "float32" if fits(n_expanded, FLOAT) else "bfloat16"
    element = STORAGE_DTYPES[storage].itemsize
    adjacency, batch, pruning = estimate(n_expanded, element)
    work = _row_work(feature_layers, feature_positions, _expanded_rows(n_features, n_expanded, ranking), n_expanded,
                     batch)
    seconds = (work * calibration.seconds_per_row_layer_position
               + adjacency / element * _SWEEP_PASSES * calibration.seconds_per_element)
    exact = exact_calibration or calibration
    recompute = work * exact.seconds_per_row_layer_position if storage != "float32" else 0.0
    plan = TracePlan(P, len(layout.layer_end), n_features, n_expanded, n_logits, n_sources, batch, adjacency,
                     batch * per_row, pruning, held, available, seconds, None, storage, recompute)
    if plan.fits:
        return plan
    low, high = 0, n_expanded  # the largest budget that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid, element) else (low, mid - 1)
    return TracePlan(**{**plan.__dict__, "budget_hint": low or None})


def check_forward_fits(n_positions: int, n_layers: int, n_heads: int, d_model: int, device: torch.device,
                       memory_limit: int | None = None) -> None:
    """Refuse a prompt whose clean run alone would not fit: the attention patterns [H, P, P] of every layer are
    recorded (and transposed once for the backward pass), with ~6 [P, d] records per layer."""
    need = (2 * n_layers * n_heads * n_positions ** 2 + 8 * n_layers * n_positions * d_model) * FLOAT
    available = memory_available(device, memory_limit)
    if need > available.bytes:
        raise TraceDoesNotFit(
            f"a {n_positions}-token prompt needs about {format_bytes(need)} for its forward pass alone (the attention "
            f"patterns of {n_layers} layers) but the trace may use {format_bytes(available.bytes)} "
            f"({available.source}); nothing was run. Fix it with a shorter prompt or a device with more memory")
