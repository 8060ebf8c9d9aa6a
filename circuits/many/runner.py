"""``trace-many``: one graph per prompt in ``OUT/graphs/``, resumable, sharded across torchrun ranks.

Rank r of R traces the prompts i with i % R == r (deterministic, no scheduler); every graph is written atomically
by :meth:`AttributionGraph.save`. A graph already in the folder is skipped when it loads and holds this prompt
traced with these settings; a damaged or partial one is traced again. A run from before the compact graph file
(``graphs/ID.json``) resumes too: its done graphs are rewritten as ``ID.safetensors``, not traced again. A prompt
that fails is recorded (its error in ``OUT/failures-rank-R.json``, then in the index) and the run goes on. After a
barrier, rank 0 writes ``OUT/index.json`` from the graph files themselves, so the index is the same however the
prompts were shared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from circuits.graph.attribution_graph import AttributionGraph
from circuits.settings import TraceSettings
from dictionaries.atomic_output import write_text_atomic

from .prompts import PromptSpec

INDEX_NAME = "index.json"
GRAPHS_DIR = "graphs"


def prompt_settings(base: TraceSettings, spec: PromptSpec) -> TraceSettings:
    """``base`` with the line's own target, logit difference, position and chat flag."""
    update: dict = {}
    if spec.targets is not None:
        update.update(targets=spec.targets, logit_diff=None)
    if spec.logit_diff is not None:
        update.update(logit_diff=spec.logit_diff, targets=None)
    if spec.position is not None:
        update["position"] = spec.position
    if spec.chat is not None:
        update["chat"] = spec.chat
    return TraceSettings.model_validate({**base.model_dump(), **update})


def load_done_graph(path: Path, spec: PromptSpec, settings: TraceSettings) -> AttributionGraph | None:
    """The graph at ``path`` when it loads and is this prompt traced with ``settings``; else None."""
    if not path.is_file():
        return None
    try:
        graph = AttributionGraph.load(path)
    except Exception:  # noqa: BLE001  (a damaged or partial file, or an older schema: traced again)
        return None
    meta = graph.metadata
    same = meta.prompt == spec.prompt and meta.settings.model_dump(mode="json") == settings.model_dump(mode="json")
    return graph if same else None


def my_share(count: int, rank: int, world_size: int) -> list[int]:
    """The prompt numbers rank ``rank`` traces: i % world_size == rank."""
    return [i for i in range(count) if i % world_size == rank]


def trace_share(specs: list[PromptSpec], out: Path, base: TraceSettings, trace_one: Callable[[str, TraceSettings],
                AttributionGraph], rank: int = 0, world_size: int = 1, progress: bool = True) -> dict[str, str]:
    """Trace this rank's share of ``specs`` into ``out/graphs``; returns {id: error} of the prompts that failed
    (also written to ``out/failures-rank-R.json``)."""
    from tqdm import tqdm

    graphs = out / GRAPHS_DIR
    graphs.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    share = my_share(len(specs), rank, world_size)
    bar = tqdm(share, desc=f"prompts (rank {rank})" if world_size > 1 else "prompts", unit="prompt",
               disable=not progress, position=rank)
    for i in bar:
        spec = specs[i]
        path = graphs / spec.graph_name
        try:
            settings = prompt_settings(base, spec)
            if load_done_graph(path, spec, settings) is not None:
                continue
            legacy = load_done_graph(path.with_suffix(".json"), spec, settings)
            if legacy is not None:  # an older run's JSON graph of this prompt: kept, in the compact file
                legacy.save(path)
                continue
            trace_one(spec.prompt, settings).save(path)
        except Exception as exc:  # noqa: BLE001  (recorded, reported at the end; the run goes on)
            failures[spec.id] = f"{type(exc).__name__}: {exc}"
    write_text_atomic(out / f"failures-rank-{rank}.json", json.dumps(failures, indent=1, sort_keys=True) + "\n")
    return failures


def _top_logits(graph: AttributionGraph, count: int = 5) -> list[dict]:
    nodes = graph.nodes
    logits = sorted(graph.logit_nodes, key=lambda n: (-(nodes[n].get("probability") or 0.0), n))[:count]
    return [{"token": nodes[n]["token"], "probability": nodes[n].get("probability")} for n in logits]


def write_index(specs: list[PromptSpec], out: Path, base: TraceSettings, world_size: int = 1) -> dict:
    """``out/index.json``: per prompt its id, group, graph file, status (done or failed, with the error), top
    logits and scores, read from the graph files (no timings: equal runs give equal bytes)."""
    failures: dict[str, str] = {}
    for rank in range(world_size):
        part = out / f"failures-rank-{rank}.json"
        if part.is_file():
            failures.update(json.loads(part.read_text(encoding="utf-8")))
    rows = []
    for spec in specs:
        settings = prompt_settings(base, spec)
        graph = load_done_graph(out / GRAPHS_DIR / spec.graph_name, spec, settings)
        row: dict = {"id": spec.id, "group": spec.group, "prompt": spec.prompt,
                     "graph": f"{GRAPHS_DIR}/{spec.graph_name}"}
        if graph is None:
            row.update(status="failed", error=failures.get(spec.id, "no graph was written"))
        else:
            scores = graph.metadata.scores
            row.update(status="done", content_hash=graph.content_hash, top_logits=_top_logits(graph),
                       scores=None if scores is None else scores.model_dump(),
                       n_nodes=len(graph.nodes), n_edges=graph.n_edges)
        rows.append(row)
    index = {"settings": base.model_dump(mode="json"), "prompts": rows}
    write_text_atomic(out / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def read_index(out: Path) -> dict:
    from dictionaries.errors import CircuitscopeError

    path = Path(out) / INDEX_NAME
    if not path.is_file():
        raise CircuitscopeError(f"{out}: no {INDEX_NAME} (run trace-many first)")
    return json.loads(path.read_text(encoding="utf-8"))
