"""Scale benchmark (issues 13 and 17): random Gemma Scope 2-layout JumpReLU sets at real widths on the real
Gemma 3 270M and a random 1B-shaped model, traced the way `circuitscope trace` does. Prints a table.

Each case runs in a fresh process (``--case NAME`` prints one JSON line), after its dictionary set (and model)
is made once under the data folder by :mod:`benchmarks.scale_sets` (in another process, so that writing a set
never counts in a case's memory). A case times every phase separately: loading the model, loading the
dictionaries, and from the trace's own timings the forward pass (clean run, encoding, logit targets, layout),
the plan, the attribution rows and pruning (folding, influence, scores); building the graph (the rest of
``trace``) and writing the graph file. Memory: peak RSS (``ru_maxrss``) and peak anonymous memory (RssAnon,
sampled every 50 ms: the memory-mapped dictionaries' page cache is not in it), in GiB, and on a GPU the peak
allocated. Rows are the feature and logit rows computed; ms/row is attribution seconds per row.
The plan's estimate (peak memory and seconds of attribution + pruning, which every trace makes before its rows)
is printed beside the measured figures.

    python benchmarks/scale.py --list
    OMP_NUM_THREADS=1 python benchmarks/scale.py --case 16k-l0-20          # one case, a JSON line
    python benchmarks/scale.py --skip-large --threads 2                    # every case but the 262k ones
    python benchmarks/scale.py --only prune-33 prune-256 prune-512         # a table of some cases
    python benchmarks/scale.py --plan                                      # only the plans (no rows computed)
    python benchmarks/scale.py --prepare                                   # only write the sets (once)
    python benchmarks/scale.py --device cuda                               # on a GPU machine

The per-layer variants of a model (16k L0 20 and 120, 262k L0 20) sit side by side in one folder, as in a
Gemma Scope 2 download, and are picked with the loader's selectors (width, l0, affine). Disk: a 16k affine
variant ~1.5 GB; 262k affine ~24 GB; the 262k CLT ~12 GB (encoders; decoder rows written only for the features
active on the CLT case's prompt, the rest are holes: ~217 GB apparent size); the 1B model ~4 GB and its 16k
set ~2.9 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribution import PROMPTS as SHORT_PROMPTS  # the 6-, 33- and 128-token prompts
from scale_models import ensure_random_model, is_random_model_current, model_shape
from scale_sets import SetSpec, bench_dir, ensure_set, is_current

BUDGET = 7500


@dataclass(frozen=True)
class Case:
    """One row of the table: model (``270m`` real, ``1b`` random), dictionaries, prompt length and budget."""

    name: str
    target: str  # the target for this case
    width: int = 16384
    l0: int = 20
    tokens: int = 6  # prompt length with BOS
    budget: int | None = None
    model: str = "270m"
    architecture: str = "per-layer"
    affine: bool = True
    dtype: str = "float32"

    @property
    def large(self) -> bool:
        return self.width > 100_000


CASES = {c.name: c for c in [
    Case("16k-l0-20", "time/feature <= width-4096 bench; RssAnon < 2.5 GB"),
    Case("16k-l0-120", "time/feature <= width-4096 bench; RssAnon < 2.5 GB", l0=120),
    Case("262k-l0-20", "works; RssAnon < 3 GB", width=262144),
    Case("262k-l0-20-33-budget", "works; RssAnon < 3 GB", width=262144, tokens=33, budget=BUDGET),
    Case("262k-l0-20-bf16", "bf16 without a full copy (was 12.6 GB anon)", width=262144, dtype="bfloat16"),
    Case("262k-clt-l0-20", "works; RssAnon < 4 GB", width=262144, architecture="cross-layer", affine=False),
    Case("16k-128", "< 6 GB (was 20 GB), time printed", tokens=128),
    Case("16k-1024-budget", "< 8 GB and < 15 min", tokens=1024, budget=BUDGET),
    Case("1b-16k", "time and memory printed", model="1b"),
    Case("1b-16k-33-budget", "time and memory printed", model="1b", tokens=33, budget=BUDGET),
    Case("prune-33", "prune time (was 13.5 s)", tokens=33, budget=BUDGET),
    Case("prune-256", "prune time", tokens=256, budget=BUDGET),
    Case("prune-512", "prune time (was 136 s)", tokens=512, budget=BUDGET),
]}


# --- prompts ------------------------------------------------------------------------------------------------
_SUBJECTS = ["the old harbour", "a small village", "the river valley", "the northern city", "the market square",
             "the railway station", "a quiet library", "the mountain pass", "the university", "the royal palace"]
_VERBS = ["was rebuilt", "grew quickly", "was described by travellers", "became famous", "was nearly abandoned",
          "attracted merchants", "was painted by artists", "was flooded", "hosted a great fair", "changed its name"]
_TIMES = ["in the twelfth century", "after the war", "during a long winter", "in the spring of 1851",
          "before the railway came", "within a single generation", "under the new king", "in recent years"]
_REASONS = ["because the trade routes moved", "while the farmers planted wheat", "as the population doubled",
            "when the bridge was finished", "although many families left", "since the harbour was deepened"]


def prompt_text(tokenizer, tokens: int) -> str:
    """A prompt of ``tokens`` tokens with BOS (the 6-, 33- and 128-token ones of benchmarks/attribution.py, else
    varied sentences from a fixed seed cut at a token boundary)."""
    if str(tokens) in SHORT_PROMPTS:
        return SHORT_PROMPTS[str(tokens)]
    rng = random.Random(tokens)
    text = ""
    while len(tokenizer(text)["input_ids"]) < tokens + 8:
        text += (f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_TIMES)}, "
                 f"{rng.choice(_REASONS)}. ")
    ids = tokenizer(text)["input_ids"]  # BOS first
    cut = tokens
    while True:  # decoding and encoding again may merge at the cut: move the cut until the count is right
        candidate = tokenizer.decode(ids[1:cut]).rstrip()
        count = len(tokenizer(candidate)["input_ids"])
        if count == tokens or cut > tokens + 8:
            return candidate
        cut += 1 if count < tokens else -1


# --- where things are -----------------------------------------------------------------------------------------
def model_source(case: Case, data_dir: Path) -> str:
    """What load_model gets: the registry name of the real 270M, or the random 1B-shaped checkpoint folder."""
    return "gemma-3-270m" if case.model == "270m" else str(data_dir / "models" / "gemma-3-1b-random")


def set_spec(case: Case, n_layers: int, d_model: int, tokenizer) -> SetSpec:
    """The case's set; a CLT's decoder rows are written for the features active on every CLT case's prompt."""
    decoder_prompts = () if case.architecture != "cross-layer" else tuple(sorted({
        prompt_text(tokenizer, c.tokens) for c in CASES.values()
        if (c.model, c.architecture, c.width, c.l0, c.affine) == (case.model, case.architecture, case.width, case.l0,
                                                                  case.affine)}))
    return SetSpec(model=case.model, n_layers=n_layers, d_model=d_model, width=case.width, l0=case.l0,
                   affine=case.affine, architecture=case.architecture, decoder_prompts=decoder_prompts)


def set_root(case: Case, data_dir: Path) -> Path:
    """One folder per model holding every variant, like a downloaded Gemma Scope 2 repository."""
    return data_dir / f"gemma-scope-2-{case.model}-random"


def case_spec(case: Case, data_dir: Path) -> SetSpec:
    """The case's set, from its model's config and tokenizer (no weights loaded)."""
    from transformers import AutoTokenizer

    from dictionaries.models.default_model import ensure_default_checkpoint
    from dictionaries.models.loading import model_dimensions

    source = model_source(case, data_dir)
    n_layers, d_model = model_dimensions(source)
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_checkpoint()) if case.model == "270m" else source)
    return set_spec(case, n_layers, d_model, tokenizer)


def is_prepared(case: Case, data_dir: Path) -> bool:
    if case.model == "1b" and not is_random_model_current(Path(model_source(case, data_dir)), model_shape("1b")):
        return False
    return is_current(case_spec(case, data_dir), set_root(case, data_dir))


def prepare(case: Case, data_dir: Path) -> None:
    """Make the case's model (1B) and dictionary set unless they are there already."""
    from dictionaries.models.loading import load_model

    if case.model == "1b":
        ensure_random_model(Path(model_source(case, data_dir)), model_shape("1b"))
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    ensure_set(case_spec(case, data_dir), set_root(case, data_dir), lambda: load_model(model_source(case, data_dir)),
               log)


# --- measuring ------------------------------------------------------------------------------------------------
class MemorySampler:
    """Peak VmRSS and RssAnon of this process, read from /proc/self/status every ``interval`` seconds."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, {"VmRSS": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        """Bytes now, and update the peaks."""
        now = {}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    now[key] = int(value.split()[0]) * 1024
        except OSError:
            return now
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def plan_estimate(metadata) -> dict | None:
    """The plan's estimate for a traced case (None when the trace recorded no plan): peak bytes (held
    + adjacency + max(batch, pruning); RssAnon terms on a CPU) and seconds of attribution and pruning."""
    plan = getattr(metadata, "plan", None)
    if plan is None:
        return None
    return {"est_peak_gb": _gb(plan.peak_bytes), "est_s": round(plan.seconds, 2), "est_batch": plan.batch_size,
            "est_recompute_s": round(plan.recompute_seconds, 2)}


def _gb(n: float) -> float:
    return round(n / 2**30, 3)


def run_case(case: Case, data_dir: Path, device: str, device_map: str | None, plan_only: bool) -> dict:
    """Load, trace and save ``case`` in this process; every phase's seconds and the peaks (GiB)."""
    import torch

    from circuits.engine.attribution import plan_attribution
    from circuits.settings import TraceSettings
    from circuits.tracing import trace
    from dictionaries.formats.registry import load_dictionaries
    from dictionaries.models.loading import load_model

    out: dict = {"case": case.name, "device": device_map or device, "threads": torch.get_num_threads()}
    with MemorySampler() as memory:
        start = time.perf_counter()
        lm = load_model(model_source(case, data_dir), dtype=case.dtype,
                        device=None if device_map else device, device_map=device_map)
        out["load_model_s"] = round(time.perf_counter() - start, 2)
        spec = set_spec(case, lm.n_layers, lm.d_model, lm.tokenizer)
        path = spec.path(set_root(case, data_dir))
        start = time.perf_counter()
        dicts = load_dictionaries(path, dtype=lm.dtype, **spec.selectors())  # as cli/loading.py does
        dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
        out["load_dicts_s"] = round(time.perf_counter() - start, 2)
        out["anon_after_load_gb"] = _gb(memory.sample().get("RssAnon", 0))
        prompt = prompt_text(lm.tokenizer, case.tokens)
        settings = TraceSettings(max_features=case.budget, dtype=case.dtype)
        start = time.perf_counter()
        if plan_only:  # what `circuitscope trace --plan` prints, without the rows
            plan = plan_attribution(lm, dicts, prompt, settings)
            out.update(tokens=plan.n_positions, active=plan.n_features, rows=plan.n_expanded + plan.n_logits,
                       plan_only_s=round(time.perf_counter() - start, 2), est_peak_gb=_gb(plan.peak_bytes),
                       est_s=round(plan.seconds, 2), est_batch=plan.batch_size, fits=plan.fits,
                       storage=plan.storage, est_recompute_s=round(plan.recompute_seconds, 2))
        else:
            graph = trace(lm, dicts, prompt, settings, dictionaries_source=str(path))
            trace_s = time.perf_counter() - start
            meta = graph.metadata
            timings = meta.timings
            out.update({f"{k}_s": round(v, 2) for k, v in timings.items() if k != "total"})
            out["build_graph_s"] = round(trace_s - timings["total"], 2)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                written = graph.save(Path(tmp) / "graph.safetensors")
                out["write_graph_s"] = round(time.perf_counter() - start, 2)
                out["graph_mb"] = round(written.stat().st_size / 2**20, 1)
            tokens = len(meta.token_ids)
            out.update(tokens=tokens, active=meta.n_active_features,
                       rows=meta.n_expanded_features + len(graph.logit_nodes),
                       l0=round(meta.n_active_features / max(1, (tokens - 1) * lm.n_layers), 1),
                       nodes=len(graph.nodes), edges=len(graph.table.edges),
                       trace_s=round(trace_s, 2))
            out["ms_per_row"] = round(1000 * timings["attribution"] / max(1, out["rows"]), 2)
            out.update(plan_estimate(meta) or {})
    out["peak_rss_gb"] = _gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out["peak_anon_gb"] = _gb(memory.peak["RssAnon"])
    if torch.cuda.is_available() and (device_map or device).startswith(("cuda", "auto")):
        out["gpu_peak_gb"] = _gb(torch.cuda.max_memory_allocated())
    return out


# --- the table --------------------------------------------------------------------------------------------------
COLUMNS = [  # (key, header, width)
    ("case", "case", 20), ("tokens", "tok", 5), ("active", "active", 7), ("rows", "rows", 7), ("l0", "L0", 6),
    ("load_model_s", "model_s", 8), ("load_dicts_s", "dicts_s", 8), ("forward_s", "fwd_s", 7),
    ("plan_s", "plan_s", 7), ("attribution_s", "attr_s", 8),
    ("ms_per_row", "ms/row", 7), ("prune_s", "prune_s", 8),
    ("build_graph_s", "build_s", 8), ("write_graph_s", "write_s", 8), ("peak_rss_gb", "rss_GB", 7),
    ("peak_anon_gb", "anon_GB", 8), ("est_peak_gb", "est_GB", 7), ("est_s", "est_s", 7),
    ("est_recompute_s", "est_rc_s", 8),
]


def row(result: dict) -> str:
    cells = []
    for key, _, width in COLUMNS:
        value = result.get(key)
        cells.append(f"{'n/a' if value is None else value!s:>{width}}" if key != "case" else f"{value:<{width}}")
    return " ".join(cells)


def header() -> str:
    return " ".join(f"{h:<{w}}" if k == "case" else f"{h:>{w}}" for k, h, w in COLUMNS)


def run_in_subprocess(args: list[str], threads: int | None, timeout: float | None,
                      echo: bool = False) -> tuple[int, str, str, float]:
    """Run this script with ``args`` in a fresh process; (exit code, stdout, stderr, its peak RSS in GiB, which
    wait4 reports even when the process was killed). ``echo``: its stderr goes to ours as it comes."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=stdout, stderr=None if echo else stderr,
                                env=env,
                                start_new_session=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        stdout.seek(0)
        stderr.seek(0)
        return proc.returncode, stdout.read(), stderr.read(), _gb(usage.ru_maxrss * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), help="run this one case here and print its JSON line")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), metavar="CASE", help="a table of these cases")
    parser.add_argument("--list", action="store_true", help="list the cases and their targets")
    parser.add_argument("--data-dir", type=Path, default=bench_dir(),
                        help="where sets and the random 1B model are written once (default: %(default)s)")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 262k cases (~36 GB of sets)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--device-map", default=None,
                        help="load the model with this accelerate device_map (e.g. auto) instead of --device")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each case (default: torch's)")
    parser.add_argument("--plan", action="store_true", help="only the plans (`trace --plan`): no rows computed")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a case is killed")
    parser.add_argument("--json", action="store_true", help="print the JSON lines after the table")
    parser.add_argument("--prepare", action="store_true", help="only write the sets (and model) the cases need")
    args = parser.parse_args()
    if args.list:
        for case in CASES.values():
            budget = f", budget {case.budget:,}" if case.budget else ""
            print(f"{case.name:<22} {case.model} {case.architecture} width {case.width:,} L0 ~{case.l0} "
                  f"{'affine ' if case.affine else ''}{case.dtype}, {case.tokens} tokens{budget}: {case.target}")
        return
    everything = [n for n, c in CASES.items() if not (args.skip_large and c.large)]
    names = [args.case] if args.case else args.only or everything
    common = ["--data-dir", str(args.data_dir), "--device", args.device] + (
        ["--device-map", args.device_map] if args.device_map else []) + (
        ["--threads", str(args.threads)] if args.threads else []) + (["--plan"] if args.plan else [])
    if args.prepare and args.case:  # (in a process of its own: see _prepared)
        prepare(CASES[args.case], args.data_dir)
        return
    prepared = [name for name in names if _prepared(name, args.data_dir, common, args.threads)]
    if args.prepare:
        return
    if args.case:
        if prepared:
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            print(json.dumps(run_case(CASES[args.case], args.data_dir, args.device, args.device_map, args.plan)))
        return
    print(header(), flush=True)
    results = []
    for name in prepared:
        code, out, err, child_rss = run_in_subprocess(["--case", name] + common, args.threads, args.timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if code != 0 or not lines:
            last = (err.strip().splitlines() or ["(no output)"])[-1]
            print(f"{name:<20} failed (exit {code}, peak RSS {child_rss} GB): {last}", flush=True)
            continue
        results.append(json.loads(lines[-1]))
        print(row(results[-1]), flush=True)
    if args.json:
        for result in results:
            print(json.dumps(result))


def _prepared(name: str, data_dir: Path, common: list[str], threads: int | None) -> bool:
    """Whether case ``name``'s set is there, writing it first (in another process) if not."""
    if is_prepared(CASES[name], data_dir):
        return True
    print(f"# {name}: writing its set under {data_dir} (once)", file=sys.stderr, flush=True)
    code, _, err, _ = run_in_subprocess(["--prepare", "--case", name] + common, threads, None, echo=True)
    if code != 0:
        print(f"{name:<20} failed to prepare: {(err.strip().splitlines() or ['?'])[-1]}", flush=True)
    return code == 0


if __name__ == "__main__":
    main()
