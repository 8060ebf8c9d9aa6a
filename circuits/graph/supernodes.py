"""Supernodes: merge groups of nodes into one node each.

A group (a name and its member ids) becomes the node ``supernode:{name}`` of kind ``supernode``, whose
``children`` lists the members. Edges into and out of the group are summed (several members fed by one
source give one edge with the sum of their weights); edges between members disappear. The merged node's
``influence`` and ``activation`` are the members' sums; ``layer`` is the members' mean layer (rounded) and
``position`` their last position; ``feature`` and ``feature_key`` stay when every member is the same
feature, so comparisons by feature identity still see it. Nodes outside every group are untouched, and the
result is an ordinary :class:`~circuits.graph.attribution_graph.AttributionGraph` that every query accepts.

Groupings: a user's mapping, :func:`group_by_feature` (one feature across positions),
:func:`group_by_label` (nodes that share a label) or :func:`group_automatically` (concepts for reading, below).
Groups of one node are left alone; :func:`node_groups` picks a grouping by name (``auto``, ``label``,
``feature``) and :func:`describe_groups` summarises groups for a table.

Automatic groups (:class:`AutoGrouping`): only feature nodes are grouped (tokens, errors, remainders and logits
stay as they are). Features are first split into buckets of one layer band (``band`` consecutive layers,
counted from layer 0) and one position. Inside a bucket, two features are similar by the mean of two cosine
similarities: of their output profiles (the signed normalised weights of their out-edges, one entry per target
node) and of their input profiles (the same for their in-edges), plus ``label_bonus`` when their labels agree.
Average-linkage agglomerative clustering then joins the most similar clusters while their mean similarity is at
least ``threshold``. A group is named ``L{low}-{high}@{position}#{rank}`` (``L{layer}@...`` for one layer; rank by
influence among the groups of those layers and position) and labelled with its most influential member's label.

Acyclic by construction: within a band, one member can reach another through a node outside the group (an error
or a feature of another cluster at a layer between them), and merging would close a loop. Every edge of an
attribution graph goes up in layer, so a group whose members share one layer can never close one. After
clustering, every group that lies on a cycle of the merged graph (a strongly connected component) is split into
its layers; a group still on a cycle (only in a graph with edges within a layer) is dissolved.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import networkx as nx

from dictionaries.errors import CircuitscopeError

from .attribution_graph import AttributionGraph
from .lookup import require_node
from .weights import input_totals

if TYPE_CHECKING:
    import torch

SUPERNODE_PREFIX = "supernode:"


def merge_nodes(graph: AttributionGraph, groups: Mapping[str, Iterable[str]],
                labels: Mapping[str, str] | None = None) -> AttributionGraph:
    """A new graph in which every group of ``groups`` (name -> member ids) is one supernode, labelled
    ``labels[name]`` (default: its name)."""
    labels = labels or {}
    owner: dict[str, str] = {}
    members_of: dict[str, list[str]] = {}
    for name, members in groups.items():
        members = list(dict.fromkeys(members))
        if not members:
            raise CircuitscopeError(f"supernode {name!r} has no members")
        for node in members:
            require_node(graph, node)
            if node in owner:
                raise CircuitscopeError(f"node {node!r} is in two groups ({owner[node]!r} and {name!r})")
            owner[node] = SUPERNODE_PREFIX + name
        members_of[SUPERNODE_PREFIX + name] = members

    merged = nx.DiGraph()
    for node, data in graph.nodes.items():
        if node not in owner:
            merged.add_node(node, **data)
    for node, members in members_of.items():
        name = node.removeprefix(SUPERNODE_PREFIX)
        merged.add_node(node, **_merged_attributes(graph, labels.get(name, name), members))
    weights: dict[tuple[str, str], float] = defaultdict(float)
    for s, t, w in graph.graph.edges(data="weight"):
        s, t = owner.get(s, s), owner.get(t, t)
        if s != t:
            weights[s, t] += w
    merged.add_edges_from((s, t, {"weight": w}) for (s, t), w in weights.items())
    return AttributionGraph(merged, graph.metadata)


def _merged_attributes(graph: AttributionGraph, label: str, members: list[str]) -> dict:
    data = [graph.nodes[m] for m in members]
    keys = {d.get("feature_key") for d in data}
    one_feature = len(keys) == 1 and None not in keys
    activations = [d.get("activation") for d in data if d.get("activation") is not None]
    probabilities = [d.get("probability") for d in data if d.get("probability") is not None]
    return {
        "kind": "supernode",
        "layer": round(sum(d["layer"] for d in data) / len(data)),
        "position": max(d["position"] for d in data),
        "feature": data[0]["feature"] if one_feature else None,
        "feature_key": data[0]["feature_key"] if one_feature else None,
        "token": None,
        "token_id": None,
        "activation": sum(activations) if activations else None,
        "influence": sum(d["influence"] for d in data),
        "label": label,
        "probability": sum(probabilities) if len(probabilities) == len(data) else None,
        "members": None,
        "value": None,
        "children": members,
    }


def group_by_feature(graph: AttributionGraph) -> dict[str, list[str]]:
    """One group per feature that is active at several positions, named by its ``feature_key``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for node, key in graph.graph.nodes(data="feature_key"):
        if key is not None and graph.nodes[node]["kind"] == "feature":
            groups[key].append(node)
    return {key: nodes for key, nodes in groups.items() if len(nodes) > 1}


def group_by_label(graph: AttributionGraph) -> dict[str, list[str]]:
    """One group per label that several nodes share."""
    groups: dict[str, list[str]] = defaultdict(list)
    for node, label in graph.graph.nodes(data="label"):
        if label:
            groups[label].append(node)
    return {label: nodes for label, nodes in groups.items() if len(nodes) > 1}


@dataclass(frozen=True)
class AutoGrouping:
    """Settings of :func:`group_automatically` (see the module docstring)."""

    band: int = 2  # layers per band
    threshold: float = 0.4  # least mean similarity of two clusters that are joined, in [-1, 1 + label_bonus]
    label_bonus: float = 0.25  # added to the similarity of two features whose (non-empty) labels agree

    def __post_init__(self) -> None:
        if self.band < 1:
            raise CircuitscopeError(f"a layer band holds at least one layer, got {self.band}")


def group_automatically(graph: AttributionGraph, settings: AutoGrouping = AutoGrouping()) -> dict[str, list[str]]:
    """Groups of similar features, one layer band and one position each, that keep the graph acyclic."""
    nodes = graph.graph.nodes
    buckets: dict[tuple[int, int], list[str]] = defaultdict(list)
    for node in sorted(graph.nodes_of_kind("feature"), key=lambda n: (-nodes[n]["influence"], n)):
        buckets[nodes[node]["layer"] // settings.band, nodes[node]["position"]].append(node)
    totals = input_totals(graph)
    groups: list[list[str]] = []
    for key in sorted(buckets):
        members = buckets[key]
        if len(members) > 1:
            similarity = _similarity(graph, members, totals, settings.label_bonus)
            groups += [[members[i] for i in cluster]
                       for cluster in _average_linkage(similarity, settings.threshold) if len(cluster) > 1]
    groups = _acyclic(graph, groups)
    return {_group_name(graph, members, rank): members for rank, members in _ranked_in_buckets(graph, groups)}


def _unit_rows(pairs: list[list[tuple[str, float]]]) -> torch.Tensor:
    """Rows of signed edge profiles (one column per node at the other end), scaled to unit length.
    Shape (len(pairs), number of distinct other nodes); a row without edges stays zero."""
    import torch

    columns: dict[str, int] = {}
    at = [(i, columns.setdefault(other, len(columns)), value)
          for i, edges in enumerate(pairs) for other, value in edges]
    rows = torch.zeros(len(pairs), max(len(columns), 1), dtype=torch.float64)
    if at:
        i, j, values = zip(*at, strict=True)
        rows[list(i), list(j)] = torch.tensor(values, dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _similarity(graph: AttributionGraph, members: list[str], totals: dict[str, float], label_bonus: float
                ) -> torch.Tensor:
    """(m, m) similarity of the features ``members``: mean cosine of output and input profiles, + label bonus."""
    g = graph.graph

    def share(s: str, t: str, w: float) -> float:
        return w / totals[t] if totals[t] else 0.0

    outs = _unit_rows([[(t, share(v, t, w)) for _, t, w in g.out_edges(v, data="weight")] for v in members])
    ins = _unit_rows([[(s, share(s, v, w)) for s, _, w in g.in_edges(v, data="weight")] for v in members])
    similarity = (outs @ outs.T + ins @ ins.T) / 2
    labels = [g.nodes[v].get("label") for v in members]
    for i, j in itertools.combinations(range(len(members)), 2):
        if labels[i] and labels[i] == labels[j]:
            similarity[i, j] += label_bonus
            similarity[j, i] += label_bonus
    return similarity


def _average_linkage(similarity: torch.Tensor, threshold: float) -> list[list[int]]:
    """Average-linkage agglomerative clustering of ``similarity`` (m, m): join the two clusters of highest
    mean pairwise similarity while it is at least ``threshold``. Clusters as sorted index lists, in order of
    their first member; ties go to the lowest indices, so the result is deterministic."""
    import torch

    m = similarity.shape[0]
    linkage = similarity.clone().fill_diagonal_(float("-inf"))
    sizes = torch.ones(m, dtype=torch.float64)
    clusters: dict[int, list[int]] = {i: [i] for i in range(m)}
    while len(clusters) > 1:
        best = int(torch.argmax(linkage))
        i, j = sorted(divmod(best, m))
        if linkage[i, j] < threshold:
            break
        # Lance-Williams update for average linkage: the joined cluster's mean similarity to every other one
        joined = (sizes[i] * linkage[i] + sizes[j] * linkage[j]) / (sizes[i] + sizes[j])
        linkage[i], linkage[:, i] = joined, joined
        linkage[j], linkage[:, j] = float("-inf"), float("-inf")
        linkage[i, i] = float("-inf")
        sizes[i] += sizes[j]
        clusters[i] += clusters.pop(j)
    return [sorted(c) for _, c in sorted(clusters.items())]


def _acyclic(graph: AttributionGraph, groups: list[list[str]]) -> list[list[str]]:
    """``groups`` with every group on a cycle of the merged graph split into its layers, then dissolved."""
    for split in (_by_layer, lambda graph, members: []):
        cyclic = _groups_on_cycles(graph, groups)
        if not cyclic:
            return groups
        groups = [part for i, members in enumerate(groups)
                  for part in (split(graph, members) if i in cyclic else [members]) if len(part) > 1]
    if _groups_on_cycles(graph, groups):
        raise CircuitscopeError("the graph has a cycle before any merging; automatic groups need an acyclic graph")
    return groups


def _by_layer(graph: AttributionGraph, members: list[str]) -> list[list[str]]:
    layers: dict[int, list[str]] = defaultdict(list)
    for node in members:
        layers[graph.nodes[node]["layer"]].append(node)
    return [layers[layer] for layer in sorted(layers)]


def _groups_on_cycles(graph: AttributionGraph, groups: list[list[str]]) -> set[int]:
    """Indices of the groups that lie on a cycle of the graph with every group contracted to one node."""
    owner = {node: ("group", i) for i, members in enumerate(groups) for node in members}
    contracted = nx.DiGraph()
    contracted.add_edges_from((owner.get(s, s), owner.get(t, t)) for s, t in graph.graph.edges
                              if owner.get(s, s) != owner.get(t, t))
    on_cycles: set[int] = set()
    for component in nx.strongly_connected_components(contracted):
        if len(component) > 1:
            on_cycles |= {node[1] for node in component if isinstance(node, tuple)}
    return on_cycles


def _ranked_in_buckets(graph: AttributionGraph, groups: list[list[str]]) -> list[tuple[int, list[str]]]:
    """Each group with its rank by influence among the groups of its band and position, in a stable order."""
    nodes = graph.graph.nodes

    def influence(members: list[str]) -> float:
        return sum(nodes[n]["influence"] for n in members)

    def where(members: list[str]) -> tuple[int, int, int]:
        layers = [nodes[n]["layer"] for n in members]
        return min(layers), max(layers), nodes[members[0]]["position"]

    ordered = sorted(groups, key=lambda members: (where(members), -influence(members), members))
    ranks: dict[tuple[int, int, int], int] = defaultdict(int)
    ranked = []
    for members in ordered:
        ranked.append((ranks[where(members)], members))
        ranks[where(members)] += 1
    return ranked


def _group_name(graph: AttributionGraph, members: list[str], rank: int) -> str:
    nodes = graph.graph.nodes
    layers = sorted({nodes[n]["layer"] for n in members})
    span = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
    return f"{span}@{nodes[members[0]]['position']}#{rank}"


def group_label(graph: AttributionGraph, members: Iterable[str]) -> str:
    """The label of a group: its most influential member's label (or that member's feature key)."""
    data = max((graph.nodes[n] for n in members), key=lambda d: d["influence"])
    return data.get("label") or data.get("feature_key") or f"L{data['layer']}"


GroupingMethod = Literal["auto", "label", "feature"]
GROUPINGS: dict[GroupingMethod, Callable[[AttributionGraph], dict[str, list[str]]]] = {
    "auto": group_automatically, "label": group_by_label, "feature": group_by_feature}


def node_groups(graph: AttributionGraph, method: GroupingMethod) -> dict[str, list[str]]:
    """The groups of ``graph`` by the grouping ``method`` (``auto``, ``label`` or ``feature``)."""
    try:
        return GROUPINGS[method](graph)
    except KeyError:
        raise CircuitscopeError(f"unknown grouping {method!r}; choose one of {', '.join(GROUPINGS)}") from None


def merge_by(graph: AttributionGraph, method: GroupingMethod) -> AttributionGraph:
    """``graph`` with the groups of ``method`` merged into supernodes labelled by :func:`group_label`."""
    groups = node_groups(graph, method)
    return merge_nodes(graph, groups, {name: group_label(graph, members) for name, members in groups.items()})


@dataclass(frozen=True)
class GroupSummary:
    """One group as a table shows it: layers and positions its members span, their total influence and the
    labels of its most influential members."""

    name: str
    members: list[str]
    layers: tuple[int, int]
    positions: list[int]
    influence: float
    labels: list[str]


def describe_groups(graph: AttributionGraph, groups: Mapping[str, Iterable[str]], labels_per_group: int = 3
                    ) -> list[GroupSummary]:
    """Every group of ``groups`` summarised, the most influential first."""
    nodes = graph.graph.nodes
    summaries = []
    for name, members in groups.items():
        members = sorted(members, key=lambda n: (-nodes[n]["influence"], n))
        layers = [nodes[n]["layer"] for n in members]
        shown = list(dict.fromkeys(nodes[n].get("label") or nodes[n].get("feature_key") or n for n in members))
        summaries.append(GroupSummary(name, members, (min(layers), max(layers)),
                                      sorted({nodes[n]["position"] for n in members}),
                                      sum(nodes[n]["influence"] for n in members), shown[:labels_per_group]))
    return sorted(summaries, key=lambda s: (-s.influence, s.name))
