"""Put the graphs of a ``trace-many`` folder together: per feature, per group; recurring edges; the prompts.

A feature is ``layer:index``. In one graph its influence is the sum of its nodes' influence over positions and its
activation the largest over positions. Per group (and ``all``): the number of graphs it appears in, the mean
(over those graphs) and max of influence and activation. An edge recurs when the same ``feature_key ->
feature_key`` pair is in two graphs or more (its per-graph weight summed over positions; count and mean weight).

Storage: CSV (``features.csv``, ``edges.csv``, ``prompts.csv``) plus ``summary.json``, written atomically. CSV rather
than Parquet: every tool opens it (a spreadsheet included), floats are written as ``repr`` so they read back
exactly, and it adds no dependency. The feature and prompt tables are thousands of rows; ``edges.csv`` is the large
one (20 real graphs: 648k recurring pairs, 23 MB), where Parquet would be a few times smaller.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from circuits.graph.attribution_graph import AttributionGraph
from dictionaries.atomic_output import write_chunks_atomic, write_text_atomic

from .runner import read_index

ALL = "all"


@dataclass(frozen=True)
class FeatureEdges:
    """One graph's feature -> feature edges summed over positions: pair i runs from ``keys[sources[i]]`` to
    ``keys[targets[i]]`` (``keys``: the graph's feature keys in :attr:`GraphFeatures.influence`'s order) with
    ``weights[i]``. ``sources``, ``targets``: (P,) int32; ``weights``: (P,) float64. Arrays, not a dict of
    string pairs: a graph has hundreds of thousands of them, and a hundred graphs' worth as Python tuples took
    gigabytes."""

    sources: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.weights)


@dataclass
class GraphFeatures:
    """One graph reduced to its features and feature edges."""

    id: str
    group: str | None
    influence: dict[str, float]  # feature_key -> summed influence (its order numbers the keys of ``edges``)
    activation: dict[str, float]  # feature_key -> largest activation
    labels: dict[str, str]
    edges: FeatureEdges = field(default_factory=FeatureEdges)


def _group_sums(codes: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Equal codes put together: (the distinct codes in increasing order, then each of ``values`` summed per code,
    adding in the input's order). ``codes``, ``values``: (E,); results (U,). A stable sort, so sorted runs in
    ``codes`` (a tally and the graphs being merged into it) are merged in near-linear time."""
    if not len(codes):
        return (codes, *values)
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    return (ordered[starts], *(np.add.reduceat(v[order], starts) for v in values))


def _sum_pairs(sources: np.ndarray, targets: np.ndarray, weights: np.ndarray, n_keys: int,
               ) -> FeatureEdges:
    """Equal (source, target) pairs put together, in (source, target) order. ``sources``, ``targets``: (E,) ints
    below ``n_keys``; ``weights``: (E,)."""
    width = max(n_keys, 1)
    pairs, sums = _group_sums(sources.astype(np.int64) * width + targets, weights.astype(np.float64))
    return FeatureEdges((pairs // width).astype(np.int32), (pairs % width).astype(np.int32), sums)


def reduce_graph(graph: AttributionGraph, id: str, group: str | None) -> GraphFeatures:
    """Read from the graph's columns (no ``networkx``): per feature key its summed influence, largest activation
    and label; its feature edges summed per key pair."""
    table = graph.table
    influence: dict[str, float] = {}
    activation: dict[str, float] = {}
    labels: dict[str, str] = {}
    key_numbers: dict[str, int] = {}  # feature key -> its number, in order of first appearance
    key_of_node = np.full(len(table.nodes), -1, dtype=np.int64)  # node number -> key number, -1: not a feature
    for number, data in enumerate(table.nodes.values()):
        key = data.get("feature_key")
        if data.get("kind") != "feature" or key is None:
            continue
        key_of_node[number] = key_numbers.setdefault(key, len(key_numbers))
        influence[key] = influence.get(key, 0.0) + float(data.get("influence") or 0.0)
        act = float(data.get("activation") or 0.0)
        activation[key] = max(activation.get(key, act), act)
        if data.get("label"):
            labels[key] = data["label"]
    sources, targets = key_of_node[table.edges.sources], key_of_node[table.edges.targets]
    both = (sources >= 0) & (targets >= 0)
    edges = _sum_pairs(sources[both], targets[both], table.edges.weights[both], len(influence))
    return GraphFeatures(id, group, influence, activation, labels, edges)


def load_reduced(out: Path) -> tuple[dict, list[GraphFeatures]]:
    """The index and every done graph of ``out``, reduced, in the index's order."""
    index = read_index(out)
    reduced = []
    for row in index["prompts"]:
        if row["status"] == "done":
            reduced.append(reduce_graph(AttributionGraph.load(Path(out) / row["graph"]), row["id"], row["group"]))
    return index, reduced


def _split(key: str) -> tuple[int, int]:
    layer, index = key.split(":")
    return int(layer), int(index)


def feature_rows(reduced: list[GraphFeatures]) -> list[dict]:
    """One row per (group, feature): n_graphs, mean/max influence and activation, label."""
    groups = sorted({g.group for g in reduced if g.group is not None})
    rows = []
    labels = {k: v for g in reduced for k, v in g.labels.items()}
    for group in [ALL, *groups]:
        members = [g for g in reduced if group == ALL or g.group == group]
        influences: dict[str, list[float]] = defaultdict(list)
        activations: dict[str, list[float]] = defaultdict(list)
        for g in members:  # one pass over the graphs' features, not one per feature
            for key, value in g.influence.items():
                influences[key].append(value)
                activations[key].append(g.activation[key])
        for key in sorted(influences, key=_split):
            infl, act = influences[key], activations[key]
            layer, index = _split(key)
            rows.append({"group": group, "layer": layer, "index": index, "feature_key": key, "n_graphs": len(infl),
                         "n_group_graphs": len(members), "mean_influence": sum(infl) / len(infl),
                         "max_influence": max(infl), "mean_activation": sum(act) / len(act),
                         "max_activation": max(act), "label": labels.get(key, "")})
    return rows


class EdgeTally:
    """Feature -> feature pairs over many graphs: per pair the number of graphs and the sum of weights, kept as
    sorted arrays and merged as graphs are added. Each graph's pairs are sorted when added; a merge sorts the
    tally and the pending runs together with a stable sort that finds the runs (timsort), and pending graphs are
    folded in once they outgrow the tally, so memory stays near the distinct pairs, not the sum of the graphs'.
    Feature keys are numbered in order of first appearance; a pair's code is ``source number * 2**31 + target
    number``. Sums add in graph order, as a loop over the graphs would."""

    SHIFT = 2**31

    def __init__(self, merge_at: int = 1 << 20) -> None:
        self.merge_at = merge_at  # pending pairs that trigger a merge at the least
        self.numbers: dict[str, int] = {}
        self.codes = np.zeros(0, dtype=np.int64)  # (U,) sorted, distinct
        self.counts = np.zeros(0, dtype=np.int64)  # (U,)
        self.sums = np.zeros(0, dtype=np.float64)  # (U,)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, graph: GraphFeatures) -> None:
        numbers = np.array([self.numbers.setdefault(k, len(self.numbers)) for k in graph.influence], dtype=np.int64)
        if not len(graph.edges):
            return
        codes = numbers[graph.edges.sources] * self.SHIFT + numbers[graph.edges.targets]
        order = np.argsort(codes, kind="stable")
        self._pending.append((codes[order], graph.edges.weights[order]))
        self._pending_size += len(codes)
        if self._pending_size >= max(len(self.codes), self.merge_at):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        codes = np.concatenate([self.codes, *(c for c, _ in self._pending)])
        counts = np.concatenate([self.counts, *(np.ones(len(c), dtype=np.int64) for c, _ in self._pending)])
        sums = np.concatenate([self.sums, *(w for _, w in self._pending)])
        self._pending, self._pending_size = [], 0
        self.codes, self.counts, self.sums = _group_sums(codes, counts, sums)  # sums add in graph order

    def table(self, min_count: int = 2) -> RecurringEdges:
        """Pairs found in at least ``min_count`` graphs, most graphs first, then by |mean weight| descending, then
        by source and target key."""
        self._merge()
        keys = list(self.numbers)
        rank = np.empty(len(keys), dtype=np.int64)  # key number -> its place in string order
        rank[sorted(range(len(keys)), key=keys.__getitem__)] = np.arange(len(keys))
        chosen = np.flatnonzero(self.counts >= min_count)
        sources, targets = self.codes[chosen] // self.SHIFT, self.codes[chosen] % self.SHIFT
        counts, means = self.counts[chosen], self.sums[chosen] / self.counts[chosen]
        order = np.lexsort((rank[targets], rank[sources], -np.abs(means), -counts))
        return RecurringEdges(np.array(keys, dtype=object), sources[order], targets[order], counts[order],
                              means[order])


@dataclass(frozen=True)
class RecurringEdges:
    """The recurring pairs in their table order: pair i runs from ``keys[sources[i]]`` to ``keys[targets[i]]``,
    found in ``counts[i]`` graphs with mean weight ``means[i]``. ``keys``: (K,) feature keys; the rest (U,)."""

    keys: np.ndarray
    sources: np.ndarray
    targets: np.ndarray
    counts: np.ndarray
    means: np.ndarray

    def __len__(self) -> int:
        return len(self.counts)

    def _columns(self, part: slice) -> tuple[list, list, list, list]:
        """Rows ``part`` as Python lists: source keys, target keys, counts, mean weights."""
        return (self.keys[self.sources[part]].tolist(), self.keys[self.targets[part]].tolist(),
                self.counts[part].tolist(), self.means[part].tolist())

    def rows(self, start: int = 0, stop: int | None = None) -> list[dict]:
        """Rows ``start:stop`` as dicts: source, target, n_graphs, mean_weight."""
        return [{"source": s, "target": t, "n_graphs": n, "mean_weight": w}
                for s, t, n, w in zip(*self._columns(slice(start, stop)), strict=True)]

    def csv_chunks(self, rows_per_chunk: int = 1 << 16) -> Iterator[bytes]:
        """The table as CSV (``EDGE_COLUMNS``; the same text as :func:`csv_text` of :meth:`rows`), a chunk of rows
        at a time from the arrays: millions of rows are never all Python objects at once."""
        yield csv_text([], EDGE_COLUMNS).encode("utf-8")
        for start in range(0, len(self), rows_per_chunk):
            sources, targets, counts, means = self._columns(slice(start, start + rows_per_chunk))
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(zip(sources, targets, counts, map(repr, means),
                                                                  strict=True))
            yield buffer.getvalue().encode("utf-8")


def recurring_edges(reduced: list[GraphFeatures], min_count: int = 2) -> RecurringEdges:
    """Feature -> feature pairs found in at least ``min_count`` graphs: count and mean weight (see
    :meth:`EdgeTally.table` for the order)."""
    tally = EdgeTally()
    for g in reduced:
        tally.add(g)
    return tally.table(min_count)


def prompt_rows(index: dict) -> list[dict]:
    rows = []
    for row in index["prompts"]:
        scores = row.get("scores") or {}
        top = row.get("top_logits") or []
        rows.append({"id": row["id"], "group": row["group"] or "", "status": row["status"], "prompt": row["prompt"],
                     "graph": row["graph"],
                     "top_logits": " ".join(f"{t['token']!r}:{(t['probability'] or 0):.3f}" for t in top),
                     "replacement": scores.get("replacement", ""), "completeness": scores.get("completeness", ""),
                     "error": row.get("error", "")})
    return rows


def csv_text(rows: list[dict], columns: list[str], header: bool = True) -> str:
    """``rows`` as CSV: a header (unless ``header`` is False), then each row's ``columns`` in order (floats as
    ``repr``, so they read back exactly; a missing column is empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(columns)
    writer.writerows([repr(v) if isinstance(v := row.get(c, ""), float) else v for c in columns] for row in rows)
    return buffer.getvalue()


FEATURE_COLUMNS = ["group", "layer", "index", "feature_key", "n_graphs", "n_group_graphs", "mean_influence",
                   "max_influence", "mean_activation", "max_activation", "label"]
EDGE_COLUMNS = ["source", "target", "n_graphs", "mean_weight"]
PROMPT_COLUMNS = ["id", "group", "status", "prompt", "graph", "top_logits", "replacement", "completeness", "error"]


def aggregate(out: str | Path, top: int = 20, loaded: tuple[dict, list[GraphFeatures]] | None = None) -> dict:
    """Write features.csv, edges.csv, prompts.csv and summary.json into ``out``; return the summary (the HTML
    report is drawn from it by :mod:`viz.many_report`). ``loaded``: :func:`load_reduced`'s result when already
    read."""
    out = Path(out)
    index, reduced = loaded or load_reduced(out)
    features = feature_rows(reduced)
    edges = recurring_edges(reduced)
    prompts = prompt_rows(index)
    write_text_atomic(out / "features.csv", csv_text(features, FEATURE_COLUMNS))
    write_chunks_atomic(out / "edges.csv", edges.csv_chunks())
    write_text_atomic(out / "prompts.csv", csv_text(prompts, PROMPT_COLUMNS))
    by_group: dict[str, list[dict]] = defaultdict(list)
    for row in features:
        by_group[row["group"]].append(row)
    summary = {
        "n_prompts": len(index["prompts"]), "n_done": len(reduced),
        "failed": [r["id"] for r in index["prompts"] if r["status"] != "done"],
        "groups": {g: sum(1 for r in reduced if g == ALL or r.group == g) for g in by_group},
        "top_features": {g: [{k: r[k] for k in ("feature_key", "n_graphs", "mean_influence", "label")}
                             for r in sorted(rows, key=lambda r: (-r["mean_influence"] * r["n_graphs"],
                                                                  r["feature_key"]))[:top]]
                         for g, rows in by_group.items()},
        "top_edges": edges.rows(0, top),
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary
