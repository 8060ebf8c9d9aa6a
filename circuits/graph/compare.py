"""Compare two graphs: two prompts through one dictionary set, or one prompt through two sets.

Nodes are matched by an identity that does not depend on position (``match="feature"``, the default):
a feature by its ``feature_key`` ("layer:index"), a token or logit by its text, an error or remainder by
its layer, a supernode by its feature key or label. With ``match="node"`` (same prompt), node ids are
matched instead. Edges are matched by the identities of their ends; several edges of one graph that map
to the same pair (one feature at several positions) are summed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from .attribution_graph import AttributionGraph
from .node_kinds import node_kind

Match = Literal["feature", "node"]


def node_identity(node: str, data: dict, match: Match = "feature") -> str:
    """The identity under which ``node`` is matched across graphs."""
    if match == "node":
        return node
    if data.get("feature_key") is not None:
        return f"feature:{data['feature_key']}"
    return node_kind(data["kind"]).identity(node, data)


@dataclass(frozen=True)
class FeaturePresence:
    """One feature in both graphs: summed influence (0 where absent) and the positions where it is a node."""

    feature_key: str
    influence_a: float
    influence_b: float
    positions_a: list[int]
    positions_b: list[int]


@dataclass(frozen=True)
class EdgeChange:
    """An edge between two identities; a weight is None in the graph that lacks it."""

    source: str
    target: str
    weight_a: float | None
    weight_b: float | None

    @property
    def delta(self) -> float:
        return (self.weight_b or 0.0) - (self.weight_a or 0.0)


@dataclass(frozen=True)
class GraphComparison:
    """Features: shared, only in a, only in b (by influence); edges: appeared (only in b), vanished (only
    in a), changed (in both with different weights, by |delta|). Overlaps are Jaccard indices of the feature
    keys and of the edge pairs."""

    same_prompt: bool
    same_dictionaries: bool
    shared_features: list[FeaturePresence]
    only_a: list[FeaturePresence]
    only_b: list[FeaturePresence]
    appeared: list[EdgeChange]
    vanished: list[EdgeChange]
    changed: list[EdgeChange]
    feature_overlap: float
    edge_overlap: float


def _features(graph: AttributionGraph) -> dict[str, tuple[float, list[int]]]:
    out: dict[str, tuple[float, list[int]]] = {}
    for _, data in graph.nodes.items():
        key = data.get("feature_key")
        if key is not None:
            influence, positions = out.get(key, (0.0, []))
            out[key] = (influence + data["influence"], sorted({*positions, data["position"]}))
    return out


def _edges(graph: AttributionGraph, match: Match) -> dict[tuple[str, str], float]:
    ident = {n: node_identity(n, d, match) for n, d in graph.nodes.items()}
    out: dict[tuple[str, str], float] = defaultdict(float)
    for s, t, w in graph.graph.edges(data="weight"):
        out[ident[s], ident[t]] += w
    return out


def _same(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def compare_graphs(a: AttributionGraph, b: AttributionGraph, top: int | None = 20,
                   match: Match = "feature") -> GraphComparison:
    """What ``b`` shares with ``a`` and how it differs; every list is cut to its ``top`` entries."""
    fa, fb = _features(a), _features(b)

    def presence(key: str) -> FeaturePresence:
        ia, pa = fa.get(key, (0.0, []))
        ib, pb = fb.get(key, (0.0, []))
        return FeaturePresence(key, ia, ib, pa, pb)

    def by_influence(keys) -> list[FeaturePresence]:
        found = sorted((presence(k) for k in sorted(keys)), key=lambda f: -(f.influence_a + f.influence_b))
        return found[:top]

    ea, eb = _edges(a, match), _edges(b, match)

    def changes(pairs, key) -> list[EdgeChange]:
        found = [EdgeChange(s, t, ea.get((s, t)), eb.get((s, t))) for s, t in sorted(pairs)]
        return sorted(found, key=key)[:top]

    return GraphComparison(
        same_prompt=a.metadata.token_ids == b.metadata.token_ids,
        same_dictionaries=a.metadata.dictionaries == b.metadata.dictionaries,
        shared_features=by_influence(fa.keys() & fb.keys()),
        only_a=by_influence(fa.keys() - fb.keys()),
        only_b=by_influence(fb.keys() - fa.keys()),
        appeared=changes(eb.keys() - ea.keys(), lambda c: -abs(c.weight_b)),
        vanished=changes(ea.keys() - eb.keys(), lambda c: -abs(c.weight_a)),
        changed=changes({e for e in ea.keys() & eb.keys() if not _same(ea[e], eb[e])}, lambda c: -abs(c.delta)),
        feature_overlap=_jaccard(set(fa), set(fb)),
        edge_overlap=_jaccard(set(ea), set(eb)),
    )
