"""`trace` -> AttributionGraph: node and edge structure, remainders, influence, scores, pruning and the JSON file.

Influence, scores and pruning are also checked on small hand-built adjacencies whose answers are computed by
hand (or densely, for the influence series), so the definitions in circuits/influence.py and circuits/pruning.py
are pinned down independently of the tracing engine.
"""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch
from conftest import PROMPT
from test_attribution_edges import Frozen, dense_rows, make_dictionaries

from circuits.engine.attribution import attribute
from circuits.engine.edge_rows import RowBlock
from circuits.engine.influence import graph_scores, node_influence
from circuits.engine.node_layout import (
    ERROR,
    FEATURE,
    LOGIT,
    TOKEN,
    NodeLayout,
    build_layout,
)
from circuits.engine.pruning import fold_remainders, prune, remainder_influence
from circuits.engine.replacement import ActiveFeatures
from circuits.graph.attribution_graph import (
    GRAPH_SCHEMA_VERSION,
    AttributionGraph,
    NodeData,
)
from circuits.settings import TraceSettings
from circuits.tracing import trace
from dictionaries.errors import CircuitscopeError
from dictionaries.models.hook_sites import record_mlp_io

NODE_FIELDS = set(NodeData.model_fields) - {"id"}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def dicts(tiny_lm):
    return make_dictionaries(tiny_lm, "per-layer", skip=True, seed=4)


@pytest.fixture(scope="module")
def clt(tiny_lm):
    return make_dictionaries(tiny_lm, "cross-layer", skip=False, seed=5)


@pytest.fixture(scope="module")
def graph(tiny_lm, dicts):
    return trace(tiny_lm, dicts, PROMPT, TraceSettings(batch_size=32))


@pytest.fixture(scope="module")
def budget_settings():
    return TraceSettings(max_features=50, batch_size=16, node_threshold=1.0, edge_threshold=1.0)


@pytest.fixture(scope="module")
def budget_graph(tiny_lm, clt, budget_settings):
    return trace(tiny_lm, clt, PROMPT, budget_settings)


# --- structure of a traced graph -----------------------------------------------------------------------------


def _expected_logits(lm, settings: TraceSettings) -> list[int]:
    with torch.no_grad():
        logits = lm.model(input_ids=lm.tokenize(PROMPT), use_cache=False).logits[0, -1].float()
    probs = torch.softmax(logits, -1).double()
    order = torch.argsort(probs, descending=True).tolist()
    chosen, total = [], 0.0
    for token in order:
        chosen.append(token)
        total += float(probs[token])
        if total >= settings.logit_prob or len(chosen) == settings.max_logits:
            break
    return chosen


def test_trace_returns_a_typed_layered_graph(tiny_lm, dicts, graph):
    assert isinstance(graph, AttributionGraph) and isinstance(graph.graph, nx.DiGraph)
    G = graph.graph
    n_layers = tiny_lm.n_layers
    prefix = {"token": "token@", "feature": "feature:", "error": "error:", "remainder": "remainder:", "logit": "logit:"}
    for node, data in G.nodes(data=True):
        typed = NodeData(id=node, **data)  # every attribute has its documented type; no unknown attributes
        assert node.startswith(prefix[typed.kind]) and node.endswith(f"@{typed.position}")
        assert -1 <= typed.layer <= n_layers
        if typed.kind == "token":
            assert typed.layer == -1 and typed.token_id == int(graph.metadata.token_ids[typed.position])
        if typed.kind == "feature":
            assert node == f"feature:{typed.layer}:{typed.feature}@{typed.position}"
            assert typed.feature_key == f"{typed.layer}:{typed.feature}"
            assert typed.activation is not None and typed.activation > 0
        if typed.kind == "logit":
            assert typed.layer == n_layers and typed.probability is not None
    for source, target, data in G.edges(data=True):
        s, t = G.nodes[source], G.nodes[target]
        assert s["layer"] < t["layer"], (source, target)
        assert s["position"] <= t["position"], (source, target)
        assert t["kind"] in ("feature", "logit") and s["kind"] != "logit"
        assert isinstance(data["weight"], float) and data["weight"] != 0
    # every token and every logit target is a node
    P = len(graph.metadata.tokens)
    assert sorted(graph.nodes_of_kind("token")) == sorted(f"token@{p}" for p in range(P))
    expected = _expected_logits(tiny_lm, TraceSettings())
    assert sorted(graph.logit_nodes) == sorted(f"logit:{t}@{P - 1}" for t in expected)
    kinds = {data["kind"] for _, data in G.nodes(data=True)}
    assert kinds == {"token", "feature", "error", "logit"}


def test_every_node_carries_every_documented_attribute(graph):
    """graph.py: "Every node carries kind, layer, ..., members and value"; AttributionGraph: "graph.nodes[id]
    holds a NodeData's fields (without id)". A freshly traced graph must look like a loaded one."""
    missing = {node: sorted(NODE_FIELDS - set(data)) for node, data in graph.graph.nodes(data=True)}
    missing = {node: fields for node, fields in missing.items() if fields}
    assert not missing, f"{len(missing)} nodes lack attributes, e.g. {next(iter(missing.items()))}"


def test_node_values_activations_and_probabilities(tiny_lm, dicts, graph):
    """value: a feature's pre-activation x @ W_enc + b_enc, a logit's logit minus the mean logit."""
    G = graph.graph
    ids = torch.tensor([graph.metadata.token_ids])
    with torch.no_grad():
        rec = record_mlp_io(tiny_lm, ids, with_logits=True)
    logits = rec.logits[0, -1].float()
    probs = torch.softmax(logits, -1)
    for node in graph.nodes_of_kind("feature"):
        d = G.nodes[node]
        layer, index, position = d["layer"], d["feature"], d["position"]
        pre = rec.inputs[layer, 0, position].float() @ dicts.encoder_weight(layer) + dicts.encoder_bias(layer)
        assert d["value"] == pytest.approx(float(pre[index]), rel=1e-4, abs=1e-5)
        assert d["activation"] == pytest.approx(float(dicts.activation(layer)(pre)[index]), rel=1e-4, abs=1e-5)
    for node in graph.logit_nodes:
        d = G.nodes[node]
        assert d["value"] == pytest.approx(float(logits[d["token_id"]] - logits.mean()), rel=1e-4, abs=1e-5)
        assert d["probability"] == pytest.approx(float(probs[d["token_id"]]), rel=1e-4)
        assert d["token"] == tiny_lm.tokenizer.decode([d["token_id"]])


def test_scores_are_fractions(graph, budget_graph):
    for g in (graph, budget_graph):
        s = g.metadata.scores
        for value in (s.replacement, s.completeness, s.replacement_unpruned, s.completeness_unpruned):
            assert 0.0 <= value <= 1.0
        assert 0.0 < s.replacement < 1.0  # random dictionaries: errors carry part of the influence


def test_metadata(tiny_lm, dicts, graph):
    meta = graph.metadata
    assert meta.prompt == PROMPT and meta.n_layers == tiny_lm.n_layers and meta.model == tiny_lm.name
    assert meta.tokens == ["<bos>"] + PROMPT.split()
    assert meta.token_ids == tiny_lm.tokenize(PROMPT)[0].tolist()
    assert meta.target_position == len(meta.tokens) - 1 == 13
    assert meta.n_expanded_features == meta.n_active_features > 0
    assert meta.dictionaries.kind == "skip-transcoder" and meta.dictionaries.d_model == tiny_lm.d_model
    assert meta.settings == TraceSettings(batch_size=32)
    assert {"forward", "attribution", "prune", "total"} <= set(meta.timings)


# --- budgets and remainders ----------------------------------------------------------------------------------


def test_budget_folds_every_unexpanded_feature_into_one_remainder(tiny_lm, clt, budget_settings, budget_graph):
    G = budget_graph.graph
    meta = budget_graph.metadata
    assert meta.n_expanded_features == 50 < meta.n_active_features
    att = attribute(tiny_lm, clt, PROMPT, budget_settings)  # deterministic: the same features are expanded
    f = att.replacement.features
    unexpanded = (~att.expanded).nonzero().flatten()
    per_site: dict[tuple[int, int], int] = {}
    for k in unexpanded.tolist():
        key = (int(f.layer[k]), int(f.position[k]))
        per_site[key] = per_site.get(key, 0) + 1
    remainders = budget_graph.nodes_of_kind("remainder")
    assert remainders
    A, computed = dense_rows(att)
    for node in remainders:
        d = G.nodes[node]
        assert node == f"remainder:{d['layer']}@{d['position']}"
        assert d["members"] == per_site[(d["layer"], d["position"])]
        assert d.get("feature") is None and d["activation"] > 0
    # with thresholds 1.0 every (layer, position) whose unexpanded features reach a computed row is drawn
    reaching = set()
    for k in unexpanded.tolist():
        if A[computed][:, int(att.layout.feature_node[k])].any():
            reaching.add((int(f.layer[k]), int(f.position[k])))
    drawn = {(G.nodes[n]["layer"], G.nodes[n]["position"]) for n in remainders}
    assert reaching <= drawn
    # no unexpanded feature appears as a feature node; expanded ones never fold
    expanded_keys = {
        (int(f.layer[k]), int(f.index[k]), int(f.position[k])) for k in att.expanded.nonzero().flatten().tolist()
    }
    for node in budget_graph.nodes_of_kind("feature"):
        d = G.nodes[node]
        assert (d["layer"], d["feature"], d["position"]) in expanded_keys


def test_fold_remainders_partitions_the_unexpanded_features(tiny_lm, clt, budget_settings):
    att = attribute(tiny_lm, clt, PROMPT, budget_settings)
    f = att.replacement.features
    blocks = [RowBlock(b.rows, b.values.clone()) for b in att.blocks]
    groups = fold_remainders(blocks, att.layout, f.layer, f.position, att.expanded)
    members = torch.cat([g.features for g in groups]).sort().values
    assert members.tolist() == (~att.expanded).nonzero().flatten().tolist()
    keys = [(g.layer, g.position) for g in groups]
    assert len(keys) == len(set(keys))
    for g in groups:
        assert (f.layer[g.features] == g.layer).all() and (f.position[g.features] == g.position).all()
        assert g.node == int(att.layout.feature_node[g.features[0]])


def test_remainder_edges_equal_removing_all_their_members(tiny_lm, clt, budget_settings):
    att = attribute(tiny_lm, clt, PROMPT, budget_settings)
    f = att.replacement.features
    A, computed = dense_rows(att)
    blocks = [RowBlock(b.rows, b.values.clone()) for b in att.blocks]
    groups = fold_remainders(blocks, att.layout, f.layer, f.position, att.expanded)
    folded = torch.zeros_like(A)
    for block in blocks:
        folded[block.rows, : block.width] = block.values
    frozen = Frozen(tiny_lm, clt, att)
    base = frozen()
    scale = float(A.abs().max())
    checked = 0
    for g in sorted(groups, key=lambda g: -len(g.features))[:4]:
        removed = base - frozen({int(att.layout.feature_node[k]): 0.0 for k in g.features.tolist()})
        torch.testing.assert_close(folded[computed, g.node], removed[computed], rtol=1e-4, atol=1e-5 * scale)
        others = att.layout.feature_node[g.features[1:]]
        assert not folded[:, others].any()
        checked += int(len(g.features) > 1 and folded[computed, g.node].any())
    assert checked > 0


def test_folding_loses_no_influence_in_total(tiny_lm, clt, budget_settings, budget_graph):
    """Influence flows from the logits down to sinks (tokens, errors and nodes without rows: unexpanded
    features or remainders) and every row passes on all it receives, so the sinks' influence adds up to the
    total logit weight, with and without folding, and in the traced graph (thresholds 1.0 keep every sink
    with influence)."""
    att = attribute(tiny_lm, clt, PROMPT, budget_settings)
    lay, f = att.layout, att.replacement.features
    w = att.logits.weights
    total = float(w.sum())
    sinks = (lay.kind == TOKEN) | (lay.kind == ERROR)
    unexpanded_nodes = lay.feature_node[~att.expanded]
    before = node_influence(att.blocks, lay, w)
    assert float(before[sinks].sum() + before[unexpanded_nodes].sum()) == pytest.approx(total, rel=1e-4)
    blocks = [RowBlock(b.rows, b.values.clone()) for b in att.blocks]
    groups = fold_remainders(blocks, lay, f.layer, f.position, att.expanded)
    after = node_influence(blocks, lay, w)
    group_nodes = torch.tensor([g.node for g in groups])
    assert float(after[sinks].sum() + after[group_nodes].sum()) == pytest.approx(total, rel=1e-4)
    assert float(after[group_nodes].sum()) > 0
    G = budget_graph.graph
    in_graph = sum(d["influence"] for _, d in G.nodes(data=True) if d["kind"] in ("token", "error", "remainder"))
    assert in_graph == pytest.approx(total, rel=1e-4)
    assert sum(G.nodes[n]["probability"] for n in budget_graph.logit_nodes) == pytest.approx(total, rel=1e-5)


def test_remainder_keeps_its_members_influence(tiny_lm, clt, budget_settings):
    """Folding sums signed edges (the right edge weight), but the influence a remainder is ranked and
    reported with is the sum of its members' own influence, so members whose edges cancel lose nothing."""
    att = attribute(tiny_lm, clt, PROMPT, budget_settings)
    lay, f = att.layout, att.replacement.features
    before = node_influence(att.blocks, lay, att.logits.weights)
    blocks = [RowBlock(b.rows, b.values.clone()) for b in att.blocks]
    groups = fold_remainders(blocks, lay, f.layer, f.position, att.expanded)
    adjusted = remainder_influence(before, lay, groups)
    members = torch.tensor([float(before[lay.feature_node[g.features]].sum()) for g in groups])
    folded = torch.tensor([float(adjusted[g.node]) for g in groups])
    torch.testing.assert_close(folded, members, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(adjusted.sum(), before.sum())
    graph = trace(tiny_lm, clt, PROMPT,
                  budget_settings.model_copy(update={"node_threshold": 1.0, "edge_threshold": 1.0}))
    for group in groups:
        node = f"remainder:{group.layer}@{group.position}"
        if node in graph.graph:
            assert graph.graph.nodes[node]["influence"] == pytest.approx(float(members[groups.index(group)]),
                                                                         rel=1e-4, abs=1e-9)


# --- influence and scores by hand ----------------------------------------------------------------------------


def _small_layout() -> NodeLayout:
    """2 tokens, 1 feature and 1 error at layer 0 (position 1), 1 logit: nodes 0, 1 | 2, 3 | 4."""
    return NodeLayout(
        kind=torch.tensor([TOKEN, TOKEN, FEATURE, ERROR, LOGIT]),
        layer=torch.tensor([-1, -1, 0, 0, 1]),
        position=torch.tensor([0, 1, 1, 1, 1]),
        feature_node=torch.tensor([2]),
        error_node=torch.tensor([[-1, 3]]),
        token_node=torch.tensor([0, 1]),
        logit_node=torch.tensor([4]),
        layer_end=[4],
        n_sources=4,
    )


def _small_blocks() -> list[RowBlock]:
    return [
        RowBlock(torch.tensor([1]), torch.tensor([[2.0, -1.0, 4.0, -3.0]])),  # logit <- tok0, tok1, feature, error
        RowBlock(torch.tensor([0]), torch.tensor([[1.0, -3.0]])),  # feature <- tok0, tok1
    ]


def test_influence_and_scores_on_a_hand_built_graph():
    layout, blocks, w = _small_layout(), _small_blocks(), torch.tensor([0.5])
    # logit row normalised: |2, -1, 4, -3| / 10; feature row: |1, -3| / 4
    feature, error = 0.5 * 0.4, 0.5 * 0.3
    tok0 = 0.5 * 0.2 + feature * 0.25
    tok1 = 0.5 * 0.1 + feature * 0.75
    influence = node_influence(blocks, layout, w)
    torch.testing.assert_close(influence, torch.tensor([tok0, tok1, feature, error, 0.0]))
    scores = graph_scores(blocks, layout, w)
    assert scores.replacement == pytest.approx((tok0 + tok1) / (tok0 + tok1 + error))  # 0.7
    # completeness: per row 1 - error fraction, weighted by (influence + logit weight): feature 1.0 (weight 0.2),
    # logit 1 - 0.3 (weight 0.5)
    assert scores.completeness == pytest.approx((1.0 * feature + 0.7 * 0.5) / (feature + 0.5))  # 0.7857
    # the order of the blocks does not matter
    assert node_influence(blocks[::-1], layout, w).tolist() == pytest.approx(influence.tolist())


def test_scores_of_graphs_without_errors_are_one():
    layout, w = _small_layout(), torch.tensor([1.0])
    blocks = [RowBlock(torch.tensor([1]), torch.tensor([[2.0, -1.0, 4.0, 0.0]])),
              RowBlock(torch.tensor([0]), torch.tensor([[1.0, -3.0]]))]
    scores = graph_scores(blocks, layout, w)
    assert scores.replacement == pytest.approx(1.0) and scores.completeness == pytest.approx(1.0)


def test_influence_is_the_series_over_a_three_layer_chain():
    torch.manual_seed(0)
    n_layers, P, n_logits = 3, 3, 2
    layer = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    position = torch.tensor([1, 2, 2, 1, 2, 1, 2, 2])
    features = ActiveFeatures(layer, position, torch.arange(8), torch.rand(8) + 0.1)
    error_positions = torch.tensor([False, True, True])
    layout = build_layout(features, n_layers, error_positions, n_logits, P - 1)
    n, S = layout.n_nodes, layout.n_sources
    assert S == P + 8 + n_layers * 2
    # random signed rows on each target's reachable prefix, some entries zero; a few rows per block
    A = torch.zeros(n, n)
    blocks = []
    for k in range(len(features)):
        width = layout.prefix_end(int(layer[k]))
        A[layout.feature_node[k], :width] = torch.randn(width) * (torch.rand(width) > 0.3)
        A[layout.feature_node[k], k % width] = 0.5  # no empty rows (an empty row would swallow influence)
    for j in range(n_logits):
        A[layout.logit_node[j], :S] = torch.randn(S) * (torch.rand(S) > 0.3)
    targets = layout.target_nodes
    for target_layer in range(n_layers):
        ids = (layer == target_layer).nonzero().flatten()
        for part in (ids[:1], ids[1:]):
            if len(part):
                blocks.append(RowBlock(part, A[targets[part], : layout.prefix_end(target_layer)].clone()))
    blocks.append(RowBlock(torch.arange(8, 8 + n_logits), A[layout.logit_node, :S].clone()))
    w = torch.tensor([0.6, 0.25])
    # dense: Â[t, s] = |A[t, s]| / sum_s |A[t, s]|; influence = w Â + w Â^2 + ...
    A_hat = A.abs() / A.abs().sum(1, keepdim=True).clamp_min(1e-30)
    w_vec = torch.zeros(n)
    w_vec[layout.logit_node] = w
    expected, term = torch.zeros(n), w_vec
    for _ in range(n_layers + 2):
        term = term @ A_hat
        expected += term
    assert (term @ A_hat).abs().max() == 0  # the series ends (a DAG)
    got = node_influence(blocks, layout, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(node_influence(blocks[::-1], layout, w), expected, rtol=1e-5, atol=1e-7)
    # sinks (tokens, errors) receive all of the logit weight
    sinks = (layout.kind == TOKEN) | (layout.kind == ERROR)
    assert float(got[sinks].sum()) == pytest.approx(float(w.sum()), rel=1e-5)


# --- pruning ---------------------------------------------------------------------------------------------------


def _prune_example():
    """2 tokens, 3 features at layer 0 (position 1), 1 logit: nodes 0, 1 | 2, 3, 4 | 5; logit weight 1."""
    features = ActiveFeatures(torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1]), torch.arange(3), torch.ones(3))
    layout = build_layout(features, 1, torch.tensor([False, False]), 1, 1)
    blocks = [
        RowBlock(torch.tensor([3]), torch.tensor([[0.1, 0.0, 0.5, -0.3, 0.1]])),  # logit: f0 .5, f1 .3, f2 .1
        RowBlock(torch.tensor([0, 1, 2]), torch.tensor([[0.2, -0.8], [0.5, 0.5], [1.0, 0.0]])),
    ]
    return layout, blocks, torch.tensor([1.0])


def _kept_edges(blocks, layout):
    targets = layout.target_nodes
    edges = set()
    for block in blocks:
        rows, cols = (block.values != 0).nonzero(as_tuple=True)
        edges |= {(int(s), int(targets[block.rows[r]])) for r, s in zip(rows, cols, strict=True)}
    return edges


@pytest.mark.parametrize(
    "node_threshold, edge_threshold, nodes, edges",
    [
        # influences f0 .5, f1 .3, f2 .1 (sum .9): 0.85 of it needs f0 and f1; all their edges stay
        (0.85, 1.0, {0, 1, 2, 3, 5}, {(0, 5), (2, 5), (3, 5), (0, 2), (1, 2), (0, 3), (1, 3)}),
        # after node pruning: edge scores (x 1/9) f0->L 5, tok1->f0 4, f1->L 3, tok0/tok1->f1 1.5, tok0->L 1,
        # tok0->f0 1 (sum 17); 0.7 of it (11.9) needs the top three
        (0.85, 0.7, {0, 1, 2, 3, 5}, {(2, 5), (1, 2), (3, 5)}),
        # 0.5 (8.5) needs the top two; f1 then has no outgoing edge and is dropped
        (0.85, 0.5, {0, 1, 2, 5}, {(2, 5), (1, 2)}),
        # 0.5 of the feature influence (.45) is f0 alone
        (0.5, 1.0, {0, 1, 2, 5}, {(0, 5), (2, 5), (0, 2), (1, 2)}),
    ],
)
def test_pruning_a_hand_built_graph(node_threshold, edge_threshold, nodes, edges):
    layout, blocks, w = _prune_example()
    pruned = prune(blocks, layout, w, node_threshold, edge_threshold, torch.zeros(layout.n_nodes, dtype=torch.bool))
    assert set(pruned.node_mask.nonzero().flatten().tolist()) == nodes
    assert _kept_edges(pruned.blocks, layout) == edges
    torch.testing.assert_close(pruned.influence, node_influence(blocks, layout, w))
    for block in pruned.blocks:  # kept edges keep their weights
        original = next(b for b in blocks if b.width == block.width)
        for r, row in enumerate(block.rows.tolist()):
            o = original.values[original.rows.tolist().index(row)]
            kept = block.values[r] != 0
            assert torch.equal(block.values[r][kept], o[kept])


def test_pruning_at_threshold_one_keeps_features_with_tiny_influence():
    """Threshold 1.0 means "all of the influence": a feature with a small but non-zero influence must stay.
    (In float32, 0.5 + 1e-9 == 0.5, so a cumulative sum reaches the total before the last feature.)"""
    features = ActiveFeatures(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.arange(2), torch.ones(2))
    layout = build_layout(features, 1, torch.tensor([False, False]), 1, 1)
    blocks = [
        RowBlock(torch.tensor([2]), torch.tensor([[0.5, 0.0, 0.5, 1e-9]])),
        RowBlock(torch.tensor([0, 1]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])),
    ]
    pruned = prune(blocks, layout, torch.tensor([1.0]), 1.0, 1.0, torch.zeros(layout.n_nodes, dtype=torch.bool))
    assert pruned.node_mask.all()
    assert (3, 4) in _kept_edges(pruned.blocks, layout)


def test_pruning_a_traced_graph(tiny_lm, dicts):
    """Thresholds 1.0/1.0: every feature with influence and every edge into a node with influence is in the
    graph, with its weight. Lower thresholds give a subgraph with fewer nodes."""
    settings = TraceSettings(batch_size=32, node_threshold=1.0, edge_threshold=1.0)
    full = trace(tiny_lm, dicts, PROMPT, settings)
    att = attribute(tiny_lm, dicts, PROMPT, settings)
    lay = att.layout
    influence = node_influence(att.blocks, lay, att.logits.weights)
    f = att.replacement.features
    names = {}
    for k, node in enumerate(lay.feature_node.tolist()):
        names[node] = f"feature:{int(f.layer[k])}:{int(f.index[k])}@{int(f.position[k])}"
    for node in range(lay.n_sources):
        if int(lay.kind[node]) == TOKEN:
            names[node] = f"token@{int(lay.position[node])}"
        elif int(lay.kind[node]) == ERROR:
            names[node] = f"error:{int(lay.layer[node])}@{int(lay.position[node])}"
    for j, node in enumerate(lay.logit_node.tolist()):
        names[node] = f"logit:{att.logits.token_ids[j]}@{att.position}"
    G = full.graph
    with_influence = [names[int(n)] for n in lay.feature_node if influence[n] > 0]
    assert with_influence and set(with_influence) <= set(full.nodes_of_kind("feature"))
    A, _ = dense_rows(att)
    targets = lay.target_nodes
    receiving = (influence[targets] > 0) | (lay.kind[targets] == LOGIT)
    expected_edges = {}
    for r in receiving.nonzero().flatten().tolist():
        for s in A[r].nonzero().flatten().tolist():
            expected_edges[(names[s], names[int(targets[r])])] = float(A[r, s])
    got = {(s, t): d["weight"] for s, t, d in G.edges(data=True)}
    assert set(got) <= set(expected_edges)
    missing = sorted(set(expected_edges) - set(got), key=lambda e: abs(expected_edges[e]))
    assert not missing, (f"{len(missing)} of {len(expected_edges)} edges into nodes with influence were pruned at "
                         f"thresholds 1.0, |weight| up to {abs(expected_edges[missing[-1]]):.3g}: {missing[:3]}")
    for key, weight in got.items():
        assert weight == pytest.approx(expected_edges[key], rel=1e-6, abs=1e-9)

    small = trace(tiny_lm, dicts, PROMPT, TraceSettings(batch_size=32, node_threshold=0.4, edge_threshold=0.6))
    assert small.graph.number_of_nodes() < G.number_of_nodes()
    assert small.graph.number_of_edges() < G.number_of_edges()
    assert set(small.graph.nodes) <= set(G.nodes)
    assert set(small.graph.edges) <= set(G.edges)
    assert len(small.nodes_of_kind("feature")) < len(full.nodes_of_kind("feature"))
    assert set(small.logit_nodes) == set(full.logit_nodes)


# --- JSON -----------------------------------------------------------------------------------------------------


def _same_graph(a: AttributionGraph, b: AttributionGraph) -> None:
    assert dict(a.graph.nodes(data=True)) == dict(b.graph.nodes(data=True))
    assert sorted(a.graph.edges(data=True)) == sorted(b.graph.edges(data=True))
    assert a.metadata == b.metadata


def test_json_round_trip_is_lossless(tmp_path, graph, budget_graph):
    for g in (graph, budget_graph):
        path = g.save(tmp_path / "graph.json")
        loaded = AttributionGraph.load(path)
        assert loaded.to_json() == g.to_json()
        again = AttributionGraph.load(loaded.save(tmp_path / "again.json"))
        _same_graph(again, loaded)
        _same_graph(loaded, g)  # the loaded graph is the traced one


def test_json_round_trip_of_logit_difference_settings(tmp_path, tiny_lm, dicts):
    g = trace(tiny_lm, dicts, PROMPT, TraceSettings(logit_diff=("tree", "house"), position=-2))
    tok = tiny_lm.tokenizer
    a, b = tok.convert_tokens_to_ids("tree"), tok.convert_tokens_to_ids("house")
    assert g.logit_nodes == [f"logit:{a}-{b}@12"]
    loaded = AttributionGraph.load(g.save(tmp_path / "diff.json"))
    assert loaded.metadata.settings.logit_diff == ("tree", "house")
    assert loaded.metadata == g.metadata


def _graph_json(graph) -> dict:
    return json.loads(graph.to_json())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], "not a graph JSON file"),
        (lambda text: "", "not a graph JSON file"),
        (lambda text: b"\xff\xfe\x00garbage", "not a graph JSON file"),
        (lambda text: json.dumps({**json.loads(text), "format": "something.else"}), "not a circuitscope graph"),
        (lambda text: json.dumps([1, 2, 3]), "not a circuitscope graph"),
        (lambda text: json.dumps({**json.loads(text), "schema_version": GRAPH_SCHEMA_VERSION + 1}),
         "upgrade circuitscope"),
        (lambda text: json.dumps({**json.loads(text), "schema_version": str(GRAPH_SCHEMA_VERSION + 7)}),
         "upgrade circuitscope|damaged graph file"),
        (lambda text: json.dumps({**json.loads(text), "nodes": [{"id": "x", "kind": "planet", "layer": 0,
                                                                  "position": 0}]}),
         "damaged graph file"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "metadata"}), "damaged graph file"),
    ],
    ids=["truncated", "empty", "binary", "wrong-format", "not-an-object", "newer-schema", "schema-as-text", "bad-node",
         "no-metadata"],
)
def test_loading_a_bad_file_is_one_clear_error(tmp_path, graph, damage, message):
    path = tmp_path / "bad.json"
    damaged = damage(graph.to_json())
    if isinstance(damaged, bytes):
        path.write_bytes(damaged)
    else:
        path.write_text(damaged, encoding="utf-8")
    with pytest.raises(CircuitscopeError, match=message) as info:
        AttributionGraph.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_loading_a_missing_file_or_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CircuitscopeError, match="no such graph file"):
        AttributionGraph.load(tmp_path / "missing.json")
    with pytest.raises(CircuitscopeError):
        AttributionGraph.load(tmp_path)
