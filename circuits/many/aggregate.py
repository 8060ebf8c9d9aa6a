"""Put the graphs of a ``trace-many`` folder together: per feature, per group; recurring edges; the prompts.

A feature is ``layer:index``. In one graph its influence is the sum of its nodes' influence over positions and its
activation the largest over positions. Per group (and ``all``): the number of graphs it appears in, the mean
(over those graphs) and max of influence and activation. An edge recurs when the same ``feature_key ->
feature_key`` pair is in two graphs or more (its per-graph weight summed over positions; count and mean weight).

Storage: CSV (``features.csv``, ``edges.csv``, ``prompts.csv``) plus ``summary.json``. CSV rather than Parquet:
the tables are small (thousands of rows), every tool reads CSV, and it adds no dependency; written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from circuits.graph.attribution_graph import AttributionGraph
from dictionaries.atomic_output import write_text_atomic

from .runner import read_index

ALL = "all"


@dataclass
class GraphFeatures:
    """One graph reduced to its features and feature edges."""

    id: str
    group: str | None
    influence: dict[str, float]  # feature_key -> summed influence
    activation: dict[str, float]  # feature_key -> largest activation
    labels: dict[str, str]
    edges: dict[tuple[str, str], float]  # (source key, target key) -> summed weight


def reduce_graph(graph: AttributionGraph, id: str, group: str | None) -> GraphFeatures:
    nodes = graph.graph.nodes
    influence: dict[str, float] = defaultdict(float)
    activation: dict[str, float] = {}
    labels: dict[str, str] = {}
    for _name, data in nodes(data=True):
        key = data.get("feature_key")
        if data.get("kind") != "feature" or key is None:
            continue
        influence[key] += float(data.get("influence") or 0.0)
        act = float(data.get("activation") or 0.0)
        activation[key] = max(activation.get(key, act), act)
        if data.get("label"):
            labels[key] = data["label"]
    edges: dict[tuple[str, str], float] = defaultdict(float)
    for source, target, data in graph.graph.edges(data=True):
        s, t = nodes[source].get("feature_key"), nodes[target].get("feature_key")
        if s is not None and t is not None and nodes[source].get("kind") == "feature" \
                and nodes[target].get("kind") == "feature":
            edges[(s, t)] += float(data["weight"])
    return GraphFeatures(id, group, dict(influence), activation, labels, dict(edges))


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
        keys = sorted({k for g in members for k in g.influence}, key=_split)
        for key in keys:
            infl = [g.influence[key] for g in members if key in g.influence]
            act = [g.activation[key] for g in members if key in g.activation]
            layer, index = _split(key)
            rows.append({"group": group, "layer": layer, "index": index, "feature_key": key, "n_graphs": len(infl),
                         "n_group_graphs": len(members), "mean_influence": sum(infl) / len(infl),
                         "max_influence": max(infl), "mean_activation": sum(act) / len(act),
                         "max_activation": max(act), "label": labels.get(key, "")})
    return rows


def edge_rows(reduced: list[GraphFeatures], min_count: int = 2) -> list[dict]:
    """Feature -> feature pairs found in at least ``min_count`` graphs: count and mean weight."""
    weights: dict[tuple[str, str], list[float]] = defaultdict(list)
    for g in reduced:
        for pair, w in g.edges.items():
            weights[pair].append(w)
    rows = [{"source": s, "target": t, "n_graphs": len(ws), "mean_weight": sum(ws) / len(ws)}
            for (s, t), ws in weights.items() if len(ws) >= min_count]
    return sorted(rows, key=lambda r: (-r["n_graphs"], -abs(r["mean_weight"]), r["source"], r["target"]))


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


def _csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: (repr(v) if isinstance(v, float) else v) for c, v in row.items() if c in columns})
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
    edges = edge_rows(reduced)
    prompts = prompt_rows(index)
    write_text_atomic(out / "features.csv", _csv(features, FEATURE_COLUMNS))
    write_text_atomic(out / "edges.csv", _csv(edges, EDGE_COLUMNS))
    write_text_atomic(out / "prompts.csv", _csv(prompts, PROMPT_COLUMNS))
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
        "top_edges": edges[:top],
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary
