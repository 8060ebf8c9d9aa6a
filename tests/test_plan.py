"""The plan made before every trace (circuits/engine/plan.py): its counts are exact where they can be, a trace that
would not fit is refused before any row is computed, the batch size adapts to the memory, and `trace --plan` prints
the plan and writes nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import PROMPT
from test_attribution_edges import make_dictionaries

from circuits.engine import attribution as attribution_module
from circuits.engine import plan as plan_module
from circuits.engine.attribution import attribute, plan_attribution
from circuits.engine.edge_rows import EdgeRowComputer
from circuits.engine.plan import MemoryAvailable, TraceDoesNotFit, format_bytes, parse_bytes
from circuits.graph.attribution_graph import AttributionGraph
from circuits.settings import TraceSettings
from cli import main
from dictionaries.formats.native import save_native

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def dicts(tiny_lm):
    return make_dictionaries(tiny_lm, seed=3)


def _room(monkeypatch, n_bytes: int) -> None:
    """Pretend the trace may allocate ``n_bytes`` more."""
    monkeypatch.setattr(plan_module, "memory_available",
                        lambda device, limit=None, held=None: MemoryAvailable(n_bytes, "test"))


@pytest.mark.parametrize("text, expected", [("8GB", 8 << 30), ("512 MiB", 512 << 20), ("1.5g", 3 << 29),
                                            ("1000", 1000), ("2k", 2048)])
def test_memory_sizes_are_read(text, expected):
    assert parse_bytes(text) == expected


def test_an_unreadable_memory_size_says_how_to_write_it():
    with pytest.raises(Exception, match="write e.g. 8GB"):
        parse_bytes("lots")


@pytest.mark.parametrize("budget", [None, 5])
def test_the_plan_counts_what_the_attribution_computes(tiny_lm, dicts, budget):
    settings = TraceSettings(max_features=budget, batch_size=7)
    result = attribute(tiny_lm, dicts, PROMPT, settings)
    plan = result.plan
    stored = sum(block.values.numel() for block in result.blocks) * 4
    assert plan.n_features == result.n_features
    assert plan.n_expanded == int(result.expanded.sum())
    assert plan.n_logits == len(result.logits.labels)
    assert plan.n_sources == result.layout.n_sources
    assert plan.batch_size == 7
    if budget is None:
        assert plan.adjacency_bytes == stored  # exact without a budget
    else:  # with a budget the rows are predicted from the direct influence ranking
        assert 0.3 * stored < plan.adjacency_bytes < 3 * stored
    assert plan.fits and plan.seconds > 0


def test_a_trace_that_does_not_fit_is_refused_before_any_row(tiny_lm, dicts, monkeypatch):
    full = plan_attribution(tiny_lm, dicts, PROMPT)
    # room for one row in flight and a quarter of the float32 rows: not even bfloat16 rows fit, a budget does
    per_row = full.batch_bytes // full.batch_size
    _room(monkeypatch, per_row + full.adjacency_bytes // 4)
    monkeypatch.setattr(attribution_module, "check_forward_fits", lambda *a: None)  # tested on its own below
    calls = []
    with monkeypatch.context() as patched, pytest.raises(TraceDoesNotFit) as refused:
        patched.setattr(EdgeRowComputer, "logit_rows", lambda *a, **k: calls.append(1))
        attribute(tiny_lm, dicts, PROMPT)
    message = str(refused.value)
    assert calls == []  # nothing attributed: the logit rows come first
    assert "nothing was attributed" in message and "--max-features" in message
    hint = int(message.split("--max-features ")[1].split(" ")[0].replace(",", ""))
    assert 0 < hint < full.n_features
    # the budget it names fits (its plan computes the logit rows: they rank the features it will expand)
    assert plan_attribution(tiny_lm, dicts, PROMPT, TraceSettings(max_features=hint)).fits


def test_the_batch_size_shrinks_to_the_memory_and_the_edges_stay(tiny_lm, dicts, monkeypatch):
    reference = attribute(tiny_lm, dicts, PROMPT, TraceSettings(batch_size=64))
    plan = reference.plan
    per_row = plan.batch_bytes // plan.batch_size
    # room for the rows, the working set and pruning's copies, and a few rows in flight
    spare = max(plan.pruning_bytes, 3 * per_row) + per_row // 2
    expected = spare // per_row
    assert 1 <= expected < 64
    _room(monkeypatch, plan.adjacency_bytes + spare)
    squeezed = attribute(tiny_lm, dicts, PROMPT, TraceSettings(batch_size=64))
    assert squeezed.plan.batch_size == expected and squeezed.plan.fits
    assert len(squeezed.blocks) > len(reference.blocks)  # smaller batches
    dense = {}
    for result, name in ((reference, "a"), (squeezed, "b")):
        adjacency = torch.zeros(result.n_features + len(result.logits.labels), result.layout.n_sources)
        for block in result.blocks:
            adjacency[block.rows, : block.width] = block.values
        dense[name] = adjacency
    torch.testing.assert_close(dense["a"], dense["b"], rtol=1e-5, atol=1e-7)


def test_a_prompt_too_long_for_its_forward_pass_is_refused_before_it_runs(tiny_lm, dicts, monkeypatch):
    _room(monkeypatch, 1000)
    monkeypatch.setattr(attribution_module, "record_clean_run", lambda *a: pytest.fail("the forward pass ran"))
    with pytest.raises(TraceDoesNotFit, match="forward pass alone"):
        attribute(tiny_lm, dicts, PROMPT)


def test_memory_limit_caps_what_the_trace_may_use(tiny_lm, dicts):
    limit = plan_module.memory_held(torch.device("cpu")) + 10_000
    with pytest.raises(TraceDoesNotFit, match="--memory-limit"):
        attribute(tiny_lm, dicts, PROMPT, TraceSettings(memory_limit=limit))


def test_trace_plan_prints_the_plan_and_writes_nothing(tiny_checkpoint_dir, dicts, tmp_path):
    folder = save_native(dicts, tmp_path / "dicts")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries",
                                       str(folder), "--plan", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    for word in ("active features", "rows to compute", "batch size", "peak", "time"):
        assert word in result.output
    assert not out.exists()


def test_trace_refuses_under_a_small_memory_limit_with_the_fix(tiny_checkpoint_dir, dicts, tmp_path):
    folder = save_native(dicts, tmp_path / "dicts")
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries",
                                       str(folder), "--memory-limit", "1KB", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--memory-limit" in result.stderr and not any((tmp_path / "out").glob("graph.*"))


def test_sizes_are_printed_readably():
    assert format_bytes(3 << 30) == "3.0 GB" and format_bytes(512) == "512 B"


def test_rows_are_stored_in_bfloat16_only_when_float32_would_not_fit(tiny_lm, dicts, monkeypatch):
    full = plan_attribution(tiny_lm, dicts, PROMPT)
    assert full.storage == "float32"
    # room for the rows in bfloat16 (half the adjacency) and one row in flight, not for float32 rows
    per_row = full.batch_bytes // full.batch_size
    one_row = max(per_row, 3 * max(1, full.n_logits) * full.n_sources * 4)  # a batch of 1, or pruning's blocks
    half = full.adjacency_bytes // 2
    assert half > 1024
    _room(monkeypatch, half + one_row + 1024)
    squeezed = plan_attribution(tiny_lm, dicts, PROMPT)
    assert squeezed.storage == "bfloat16" and squeezed.fits
    assert squeezed.adjacency_bytes == full.adjacency_bytes // 2


@pytest.mark.parametrize("budget", [None, 6])
def test_bfloat16_rows_give_nearly_the_same_graph_with_exact_edges(tiny_lm, dicts, budget):
    """Rows computed in bfloat16 rank and prune (within the documented bound: influence ~1%), so only nodes and
    edges at the pruning thresholds may differ; every edge the graph keeps has its exact float32 weight."""
    from circuits.tracing import trace

    exact = trace(tiny_lm, dicts, PROMPT, TraceSettings(max_features=budget, adjacency="float32"))
    rounded = trace(tiny_lm, dicts, PROMPT, TraceSettings(max_features=budget, adjacency="bfloat16"))
    assert rounded.metadata.plan is not None
    nodes_a, nodes_b = set(exact.graph.nodes), set(rounded.graph.nodes)
    edges_a, edges_b = set(exact.graph.edges), set(rounded.graph.edges)
    assert len(nodes_a & nodes_b) >= 0.97 * len(nodes_a | nodes_b)
    assert len(edges_a & edges_b) >= 0.97 * len(edges_a | edges_b)
    for s, t in edges_a & edges_b:  # recomputed in float32: exact, not rounded
        weight = exact.graph.edges[s, t]["weight"]
        assert rounded.graph.edges[s, t]["weight"] == pytest.approx(weight, rel=1e-6, abs=1e-9)
    total = sum(exact.graph.nodes[n]["influence"] for n in nodes_a)
    for node in nodes_a & nodes_b:  # influence from rounded rows: within the documented bound
        influence = exact.graph.nodes[node]["influence"]
        assert rounded.graph.nodes[node]["influence"] == pytest.approx(influence, rel=0.03, abs=1e-3 * total)
    assert rounded.metadata.scores.replacement == pytest.approx(exact.metadata.scores.replacement, rel=0.02)


def test_two_runs_of_a_trace_differ_only_in_their_run_section(tiny_lm, dicts, tmp_path):
    from circuits.tracing import trace

    texts, hashes = [], []
    for name in ("a", "b"):
        graph = trace(tiny_lm, dicts, PROMPT, TraceSettings(max_features=6))
        path = graph.save(tmp_path / f"{name}.json")
        raw = json.loads(path.read_text())
        assert raw["run"]["timings"]["total"] > 0 and raw["run"]["plan"]["batch_size"] == 64
        assert raw["metadata"]["timings"] == {} and raw["metadata"]["plan"] is None
        text = path.read_text()
        texts.append(text[: text.index(',"run":')])  # the run section is written last
        hashes.append(raw["content_hash"])
        loaded = AttributionGraph.load(path)
        assert loaded.metadata.timings == graph.metadata.timings  # the API still shows them in the metadata
        assert loaded.content_hash == raw["content_hash"]
    assert texts[0] == texts[1] and hashes[0] == hashes[1]
    assert len(hashes[0]) == 64


def test_a_schema_3_file_with_timings_in_its_metadata_still_loads(tiny_lm, dicts, tmp_path):
    from circuits.tracing import trace

    raw = json.loads(trace(tiny_lm, dicts, PROMPT, TraceSettings(max_features=6)).to_json())
    raw["schema_version"] = 3
    raw["metadata"]["timings"] = raw.pop("run")["timings"]
    del raw["content_hash"]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    old = AttributionGraph.load(tmp_path / "old.json")
    assert old.metadata.timings["total"] > 0 and old.metadata.plan is None


def test_pruning_that_consumes_the_rows_gives_the_same_graph_and_frees_them(tiny_lm, dicts):
    from circuits.engine.influence import node_influence
    from circuits.engine.pruning import prune

    result = attribute(tiny_lm, dicts, PROMPT)
    weights = result.logits.weights
    influence = node_influence(result.blocks, result.layout, weights)
    away = torch.zeros(result.layout.n_nodes, dtype=torch.bool)
    graphs = {}
    for consume in (False, True):
        blocks = [type(b)(b.rows.clone(), b.values.clone()) for b in result.blocks]
        graphs[consume] = prune(blocks, result.layout, weights, 0.8, 0.98, away, influence, consume=consume)
        assert (blocks == []) == consume  # consumed: the caller's list no longer holds the rows
    a, b = graphs[False], graphs[True]
    assert torch.equal(a.node_mask, b.node_mask) and len(a.blocks) == len(b.blocks)
    for x, y in zip(a.blocks, b.blocks, strict=True):
        assert torch.equal(x.rows, y.rows) and torch.equal(x.values, y.values)


@pytest.mark.parametrize("bfloat16_speedup, expected", [(3.7, "bfloat16"), (0.5, "float32")])
def test_auto_computes_long_traces_in_bfloat16_only_where_it_is_faster(tiny_lm, dicts, monkeypatch,
                                                                       bfloat16_speedup, expected):
    """A trace whose float32 rows would take longer than the threshold is planned (and timed) in bfloat16 where
    bfloat16 matmuls are at least 2x faster; otherwise it stays in float32. Short traces never probe bfloat16."""
    probed = []
    real_calibrate = attribution_module._calibrate

    def recording_calibrate(prepared, batch, device, dtype):
        probed.append(dtype)
        return real_calibrate(prepared, batch, device, dtype)

    monkeypatch.setattr(attribution_module, "_calibrate", recording_calibrate)
    monkeypatch.setattr(attribution_module, "_bfloat16_speedup", lambda device: bfloat16_speedup)
    short = plan_attribution(tiny_lm, dicts, PROMPT)
    assert short.seconds < attribution_module.FLOAT32_SECONDS_BEFORE_BFLOAT16
    assert short.storage == "float32" and probed == [torch.float32]
    monkeypatch.setattr(attribution_module, "FLOAT32_SECONDS_BEFORE_BFLOAT16", 0.0)
    probed.clear()
    long = plan_attribution(tiny_lm, dicts, PROMPT)
    assert long.storage == expected
    assert probed == [torch.float32] + ([torch.bfloat16] if expected == "bfloat16" else [])
    pinned = plan_attribution(tiny_lm, dicts, PROMPT, TraceSettings(adjacency="float32"))
    assert pinned.storage == "float32"
    result = attribute(tiny_lm, dicts, PROMPT)
    assert {block.values.dtype for block in result.blocks} == {plan_module.STORAGE_DTYPES[expected]}


def test_the_speedup_of_bfloat16_is_measured():
    assert plan_module.bfloat16_speedup(torch.device("cpu"), repeats=1) > 0


def test_a_budgeted_plan_counts_the_rows_the_direct_influence_ranks_first(tiny_lm, dicts):
    """With a budget the plan predicts its rows from the logit rows' ranking: its adjacency is exactly those rows'
    widths (the first budget rows of the ranking are what the first window expands)."""
    budget = 5
    result = attribute(tiny_lm, dicts, PROMPT, TraceSettings(max_features=budget, batch_size=budget))
    stored = sum(block.values.numel() for block in result.blocks) * 4
    assert result.plan.adjacency_bytes == stored


def test_freed_heap_memory_goes_back_to_the_system_and_is_not_counted_as_held():
    """glibc keeps freed memory inside its heap while small live blocks sit above it; attribution returns it
    between batches (circuits.engine.heap), and the plan's "held" is read after returning it: the forward pass and
    the timing probe free a batch's temporaries just before the plan, which the rows then reuse (counting them
    made prune-256's estimate 32% too high)."""
    import ctypes.util

    from circuits.engine.heap import return_freed_memory
    from circuits.engine.plan import _proc_field, memory_held

    if ctypes.util.find_library("c") is None or not return_freed_memory():
        pytest.skip("no glibc malloc_trim here")
    cpu = torch.device("cpu")
    before = memory_held(cpu)
    chunks = [torch.ones(4096) for _ in range(60_000)]  # 16 KB each, from the heap: ~1 GB
    keep = chunks[::100]  # a few live blocks spread over the heap keep it from shrinking by itself
    del chunks
    resident = _proc_field("/proc/self/status", "RssAnon")  # the freed heap is still the process's
    assert resident - before > 500 * 2**20, (before, resident)
    held = memory_held(cpu)  # only what is live: ~600 blocks of 16 KB
    assert held - before < (resident - before) / 4, (before, resident, held)
    assert _proc_field("/proc/self/status", "RssAnon") - before < (resident - before) / 4
    assert len(keep) == 600


_CACHE_GROWTH = """
import sys, ctypes, torch
import circuits.engine  # what every trace imports first
from circuits.engine.heap import return_freed_memory
from circuits.engine.plan import memory_held
cpu = torch.device("cpu")
torch.bmm(torch.ones(1, 2, 3, dtype=torch.bfloat16), torch.ones(1, 3, 4, dtype=torch.bfloat16))
return_freed_memory()
before = memory_held(cpu)
for n in range(64, 364):  # 300 shapes, as attribution's batches make
    torch.bmm(torch.ones(4, 32, n, dtype=torch.bfloat16), torch.ones(4, n, 256, dtype=torch.bfloat16))
return_freed_memory()
print(memory_held(cpu) - before)
"""


def _bfloat16_matmul_growth(env: dict[str, str]) -> int:
    """Bytes a fresh process still holds after 300 bfloat16 matmuls of distinct shapes (freed memory returned)."""
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in {"ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                               "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"}}
    done = subprocess.run([sys.executable, "-c", _CACHE_GROWTH], env={**clean, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def test_onednn_shape_caches_do_not_grow_a_trace():
    """oneDNN keeps what it builds for every bfloat16 matmul shape (two caches of 1,024 entries); attribution's
    shapes change every batch, so a 256-token trace held 1.4 GB the plan does not count (circuits.engine.heap).
    circuits.engine turns the caches off on import: a process holds nothing more after 300 shapes; with the caches
    at their defaults (set by the user, which is kept) it holds ~170 MB here."""
    cached = _bfloat16_matmul_growth({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"})
    if cached < 20 << 20:
        pytest.skip(f"bfloat16 matmuls do not go through oneDNN's caches here (grew {cached:,} bytes)")
    bounded = _bfloat16_matmul_growth({})
    assert bounded < cached / 10, (bounded, cached)


def test_onednn_cache_settings_of_the_user_are_kept(monkeypatch):
    from circuits.engine.heap import ONEDNN_CACHE_VARIABLES, bound_onednn_caches

    for name in [*ONEDNN_CACHE_VARIABLES, "DNNL_PRIMITIVE_CACHE_CAPACITY"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "64")  # oneDNN's older spelling counts as set
    assert bound_onednn_caches() == {"LRU_CACHE_CAPACITY": "1"}
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "16")
    assert bound_onednn_caches() == {}
    assert os.environ["LRU_CACHE_CAPACITY"] == "16"


def test_rounded_rows_plan_their_float32_recompute_at_the_float32_rate(tiny_lm, dicts, monkeypatch):
    """Rows stored in bfloat16 are recomputed in float32 for the kept targets after pruning: the plan bounds that
    time by every computed row again at the float32 rate (timed by a float32 probe), and says so; float32 rows
    need no recompute."""
    rates = {torch.float32: 1e-6, torch.bfloat16: 5e-6}
    monkeypatch.setattr(attribution_module, "_calibrate",
                        lambda prepared, batch, device, dtype: plan_module.Calibration(rates[dtype], 0.0))
    exact = plan_attribution(tiny_lm, dicts, PROMPT, TraceSettings(adjacency="float32"))
    rounded = plan_attribution(tiny_lm, dicts, PROMPT, TraceSettings(adjacency="bfloat16"))
    assert exact.recompute_seconds == 0.0 and "recomputing" not in exact.describe()
    assert exact.seconds > 0 and rounded.batch_size == exact.batch_size
    assert rounded.seconds == pytest.approx(5 * exact.seconds, rel=1e-9)
    assert rounded.recompute_seconds == pytest.approx(exact.seconds, rel=1e-9)
    assert f"then up to {rounded.recompute_seconds:.0f} s recomputing the kept rows" in rounded.describe()


@pytest.mark.parametrize("first_run_s, runs", [(0.0, 3), (0.6, 1)])
def test_a_short_timing_probe_is_repeated_and_its_fastest_run_kept(tiny_lm, dicts, monkeypatch, first_run_s, runs):
    """A first run pays one-off costs: a short probe runs up to three times and the fastest counts; a probe
    that took longer than half a second runs once."""
    prepared = attribution_module.prepare_attribution(tiny_lm, dicts, PROMPT)
    features = prepared.replacement.features
    durations = iter([first_run_s + 0.03, 0.01, 0.02])
    calls = []
    clock = [0.0]

    def timed_rows(ids, dtype):
        calls.append(ids)
        clock[0] += next(durations)

    monkeypatch.setattr(prepared.rows, "feature_rows", timed_rows)
    monkeypatch.setattr(attribution_module.time, "perf_counter", lambda: clock[0])
    calibration = attribution_module._calibrate(prepared, 4, torch.device("cpu"), torch.float32)
    assert len(calls) == runs and all(torch.equal(ids, calls[0]) for ids in calls)
    top = int(features.layer.max())
    assert len(calls[0]) == 4 and (features.layer[calls[0]] == top).all()
    work = 4 * (top + 1) * (int(features.position[calls[0]].max()) + 1)  # rows x layers x positions spanned
    fastest = 0.01 if runs == 3 else first_run_s + 0.03
    assert calibration.seconds_per_row_layer_position == pytest.approx(fastest / work)
