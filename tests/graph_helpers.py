"""Graphs for the query, export, rendering and CLI tests.

``hand_built_graph()`` is a small graph whose query answers are worked out by hand (see the numbers in
the tests); ``traced_graph(lm, ...)`` traces the tiny model with random width-16 transcoders (about half
a second) and caches the result per argument set, so every test module shares one trace.
"""

from __future__ import annotations

import networkx as nx
from conftest import PROMPT

from circuits.graph.attribution_graph import (
    AttributionGraph,
    DictionaryInfo,
    GraphMetadata,
    Scores,
)
from circuits.settings import TraceSettings

FEATURE_FIELDS = dict(feature=None, feature_key=None, token=None, token_id=None, activation=None, label=None,
                      probability=None, members=None, value=None, children=None)


def _node(kind, layer, position, influence, **fields) -> dict:
    return {**FEATURE_FIELDS, "kind": kind, "layer": layer, "position": position, "influence": influence, **fields}


def _feature(layer, index, position, influence, label=None) -> tuple[str, dict]:
    return (f"feature:{layer}:{index}@{position}",
            _node("feature", layer, position, influence, feature=index, feature_key=f"{layer}:{index}",
                  activation=1.0 + index / 10, label=label))


def hand_built_graph(variant: bool = False) -> AttributionGraph:
    """Tokens "<bos> the cat"; features 0:5 at positions 1 and 2 ("animal"), 0:7@2 ("noun"), 1:3@2
    ("animal"); error 0@2; logits " meow" (p 0.6) and " purr" (p 0.2).

    ``variant``: 0:7 is gone, 1:9@2 is new, and 0:5@2 -> 1:3@2 weighs 2 instead of 3."""
    g = nx.DiGraph()
    g.add_node("token@0", **_node("token", -1, 0, 0.01, token="<bos>", token_id=2))
    g.add_node("token@1", **_node("token", -1, 1, 0.1, token="the", token_id=6))
    g.add_node("token@2", **_node("token", -1, 2, 0.3, token="cat", token_id=43))
    features = [_feature(0, 5, 1, 0.1, "animal"), _feature(0, 5, 2, 0.3, "animal"), _feature(1, 3, 2, 0.5, "animal")]
    features.append(_feature(1, 9, 2, 0.2, "new") if variant else _feature(0, 7, 2, 0.08, "noun"))
    for node, data in features:
        g.add_node(node, **data)
    g.add_node("error:0@2", **_node("error", 0, 2, 0.05))
    g.add_node("logit:10@2", **_node("logit", 2, 2, 0.0, token=" meow", token_id=10, probability=0.6, value=3.0))
    g.add_node("logit:11@2", **_node("logit", 2, 2, 0.0, token=" purr", token_id=11, probability=0.2, value=1.0))
    edges = [
        ("token@1", "feature:0:5@1", 2.0),
        ("token@2", "feature:0:5@2", 3.0),
        ("feature:0:5@1", "feature:1:3@2", 1.0),
        ("feature:0:5@2", "feature:1:3@2", 2.0 if variant else 3.0),
        ("error:0@2", "feature:1:3@2", 1.5),
        ("feature:1:3@2", "logit:10@2", 4.0),
        ("token@2", "logit:10@2", 1.0),
        ("token@1", "logit:11@2", -2.0),
    ]
    if variant:
        edges += [("token@2", "feature:1:9@2", 1.0), ("feature:1:9@2", "logit:11@2", 0.5)]
    else:
        edges += [("token@2", "feature:0:7@2", -1.5), ("feature:0:7@2", "feature:1:3@2", -0.5),
                  ("feature:0:7@2", "logit:11@2", 2.0)]
    g.add_weighted_edges_from(edges)
    metadata = GraphMetadata(
        prompt="the cat", tokens=["<bos>", "the", "cat"], token_ids=[2, 6, 43], target_position=2, model="hand-built",
        n_layers=2, dictionaries=DictionaryInfo(kind="transcoder", n_layers=2, d_model=4, widths=[16, 16],
                                                activation="jumprelu"),
        settings=TraceSettings(), scores=Scores(replacement=0.9, completeness=0.8, replacement_unpruned=0.9,
                                                completeness_unpruned=0.8),
        n_active_features=4, n_expanded_features=4,
    )
    return AttributionGraph(g, metadata)


_TRACED: dict[tuple, AttributionGraph] = {}


def traced_graph(lm, prompt: str = PROMPT, width: int = 16, **settings) -> AttributionGraph:
    """The tiny model's graph of ``prompt`` through random transcoders (cached; do not modify it)."""
    from circuits.tracing import trace
    from dictionaries.assembly import random_dictionary_set

    key = (prompt, width, tuple(sorted(settings.items())))
    if key not in _TRACED:
        dicts = random_dictionary_set(lm.n_layers, lm.d_model, width, seed=0)
        _TRACED[key] = trace(lm, dicts, prompt, TraceSettings(**settings), dictionaries_source="random")
    return _TRACED[key]


def random_layered_graph(seed: int, n_layers: int = 4, positions: int = 3, density: float = 0.45) -> AttributionGraph:
    """A random attribution-shaped DAG: tokens (layer -1), per (layer, position) two or three features and an
    error node, two logits at the last position; every edge goes up in layer and never back in position, with
    a random signed weight. Metadata from :func:`hand_built_graph` (only the tokens matter to queries)."""
    import random

    rng = random.Random(seed)
    g = nx.DiGraph()
    below: list[str] = []
    for p in range(positions):
        g.add_node(f"token@{p}", **_node("token", -1, p, 0.1, token=f"t{p}", token_id=p))
        below.append(f"token@{p}")
    for layer in range(n_layers):
        here = []
        for p in range(positions):
            for index in range(rng.choice((2, 3))):
                node, data = _feature(layer, index, p, rng.random() / 10, label=rng.choice(("x", "y", None)))
                g.add_node(node, **data)
                here.append(node)
            g.add_node(f"error:{layer}@{p}", **_node("error", layer, p, 0.01))
            here.append(f"error:{layer}@{p}")
        for t in here:
            for s in below:
                if g.nodes[s]["position"] <= g.nodes[t]["position"] and g.nodes[t]["kind"] != "error" \
                        and rng.random() < density:
                    g.add_edge(s, t, weight=rng.choice((-1, 1)) * rng.uniform(0.1, 2.0))
            if g.nodes[t]["kind"] == "error" and rng.random() < 0.5:
                g.add_edge(f"token@{g.nodes[t]['position']}", t, weight=rng.uniform(0.1, 1.0))
        below += here
    for index, probability in ((100, 0.7), (101, 0.2)):
        logit = f"logit:{index}@{positions - 1}"
        g.add_node(logit, **_node("logit", n_layers, positions - 1, 0.0, token=f"o{index}", token_id=index,
                                  probability=probability, value=1.0))
        for s in below:
            if rng.random() < density:
                g.add_edge(s, logit, weight=rng.choice((-1, 1)) * rng.uniform(0.1, 2.0))
    metadata = hand_built_graph().metadata.model_copy(update={
        "tokens": [f"t{p}" for p in range(positions)], "token_ids": list(range(positions)), "n_layers": n_layers})
    return AttributionGraph(g, metadata)


def assert_same_graph(a: AttributionGraph, b: AttributionGraph) -> None:
    """Nodes (in order, with every attribute), edges (in order, with weights), metadata and unpruned section equal."""
    assert list(a.graph.nodes(data=True)) == list(b.graph.nodes(data=True))
    assert list(a.graph.edges(data=True)) == list(b.graph.edges(data=True))
    assert a.metadata == b.metadata
    assert a.unpruned == b.unpruned


def as_filed(graph: AttributionGraph) -> AttributionGraph:
    """The graph as a file gives it back: every NodeData field present on every node."""
    return AttributionGraph.from_file(graph.to_file())
