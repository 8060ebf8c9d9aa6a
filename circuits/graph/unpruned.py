"""What pruning removed: kept beside the pruned graph so that a saved graph can give back the whole one.

``trace(..., TraceSettings(keep_unpruned=True))`` stores an
:class:`~circuits.graph.attribution_graph.UnprunedSection` in ``AttributionGraph.unpruned``: the nodes pruning
dropped and every edge it dropped, among all nodes (edges between two kept nodes that edge pruning removed
included). The pruned graph plus that section is
the unpruned graph after remainder folding, node for node and weight for weight; :func:`full_graph`
puts them together. The section grows with the square of the number of active features (every feature
row holds an edge from nearly every source below it), so it is off by default: fine for small graphs,
gigabytes for a real model with wide dictionaries.
"""

from __future__ import annotations

import networkx as nx

from .attribution_graph import AttributionGraph, NodeData, UnprunedSection


def removed_by_pruning(full: nx.DiGraph, pruned: nx.DiGraph) -> UnprunedSection:
    """The nodes and edges of ``full`` that ``pruned`` lacks, as a compact section."""
    nodes = [NodeData(id=n, **data) for n, data in full.nodes(data=True) if n not in pruned]
    endpoint_index: dict[str, int] = {}
    sources, targets, weights = [], [], []
    for s, t, data in full.edges(data=True):
        if not pruned.has_edge(s, t):
            sources.append(endpoint_index.setdefault(s, len(endpoint_index)))
            targets.append(endpoint_index.setdefault(t, len(endpoint_index)))
            weights.append(data["weight"])
    return UnprunedSection(nodes=nodes, endpoints=list(endpoint_index), sources=sources, targets=targets,
                           weights=weights)


def full_graph(graph: AttributionGraph) -> AttributionGraph:
    """The unpruned graph: ``graph`` plus what pruning removed (``graph`` itself when nothing was kept)."""
    if graph.unpruned is None:
        return graph
    section = graph.unpruned
    whole = graph.graph.copy()
    for node in section.nodes:
        fields = node.model_dump()
        whole.add_node(fields.pop("id"), **fields)
    for s, t, w in zip(section.sources, section.targets, section.weights, strict=True):
        whole.add_edge(section.endpoints[s], section.endpoints[t], weight=w)
    return AttributionGraph(whole, graph.metadata)
