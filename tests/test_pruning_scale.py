"""Remainder folding and pruning at scale: the vectorised code gives what the plain loops gave, and its work does
not grow with the number of remainder groups (nor, for dropping dead ends, with the depth of the graph).

The references below are the loops circuits/engine/pruning.py used before (one step per group and block, and
dead features dropped one round at a time); they define the expected answers on random layouts with many groups.
Time cannot be asserted in a test, so the work is bounded by counting the tensor operations dispatched.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from circuits.engine.cumulative_cut import cumulative_cut
from circuits.engine.edge_rows import RowBlock
from circuits.engine.influence import node_influence
from circuits.engine.node_layout import FEATURE, build_layout
from circuits.engine.pruning import Remainders, fold_remainders, prune, remainder_influence
from circuits.engine.replacement import ActiveFeatures

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# --- references: the loops of the previous implementation ----------------------------------------------------


def reference_fold(blocks, layout, features_layer, features_position, expanded):
    """(groups as (node, layer, position, features) tuples, in order); folds ``blocks`` in place."""
    pending = (~expanded).nonzero().flatten()
    if len(pending) == 0:
        return []
    groups = []
    keys = features_layer[pending] * (int(features_position.max()) + 1) + features_position[pending]
    for key in keys.unique():
        members = pending[keys == key]
        nodes = layout.feature_node[members]
        groups.append((int(nodes[0]), int(features_layer[members[0]]), int(features_position[members[0]]), members))
        for block in blocks:
            inside = nodes[nodes < block.width]
            if len(inside) > 1:
                block.values[:, inside[0]] = block.values[:, inside].float().sum(1).to(block.values.dtype)
                block.values[:, inside[1:]] = 0.0
    return groups


def reference_remainder_influence(influence, layout, groups):
    influence = influence.clone()
    for group in groups:
        members = layout.feature_node[group.features]
        total = influence[members].sum()
        influence[members] = 0.0
        influence[group.node] = total
    return influence


def reference_prune(blocks, layout, weights, node_threshold, edge_threshold, folded_away, influence):
    """The previous ``prune``: (kept nodes, kept blocks, rounds of dead-end dropping that dropped something)."""
    kind = layout.kind
    is_feature = (kind == FEATURE) & ~folded_away
    cut = cumulative_cut(lambda: [influence[is_feature]], node_threshold)
    if cut == float("inf") and node_threshold < 1.0:
        cut = 0.0
    keep = ~is_feature | (influence >= cut)
    keep &= ~folded_away
    targets = layout.target_nodes

    def restrict(source_blocks):
        kept = []
        for block in source_blocks:
            rows = keep[targets[block.rows]]
            if rows.any():
                kept.append(RowBlock(block.rows[rows], block.values[rows] * keep[: block.width]))
        return kept

    pruned = restrict(blocks)
    pruned_influence = node_influence(pruned, layout, weights)
    own = torch.zeros(layout.n_nodes)
    own[layout.logit_node] = weights

    def scores():
        for block in pruned:
            magnitude = block.values.abs().float()
            coefficient = (own + pruned_influence)[targets[block.rows]] / magnitude.sum(1).clamp_min(1e-30)
            yield magnitude * coefficient[:, None]

    edge_cut = cumulative_cut(scores, edge_threshold)
    for block, score in zip(pruned, scores(), strict=True):
        block.values[score < edge_cut] = 0.0
    rounds = 0
    while True:
        has_out = torch.zeros(layout.n_nodes, dtype=torch.bool)
        for block in pruned:
            has_out[: block.width] |= (block.values != 0).any(0)
        dead = keep & (kind == FEATURE) & ~has_out
        if not dead.any():
            return keep, pruned, rounds
        keep &= ~dead
        pruned = restrict(pruned)
        rounds += 1


# --- random layouts shaped like a trace ------------------------------------------------------------------------


def random_trace(seed, n_layers=4, n_positions=6, per_site=(0, 9), expanded_share=0.2, n_logits=3, batch=8,
                 dtype=torch.float32, odd_widths=True):
    """(layout, features, expanded, blocks, weights): per (layer, position) a random number of active features,
    a random share expanded; the expanded features' rows in blocks of ``batch`` split by layer (as attribution
    makes them), rows zero beyond their target's position; some blocks with widths that cut a layer in two."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(per_site[0], per_site[1] + 1, (n_layers, n_positions), generator=g)
    layer = torch.repeat_interleave(torch.arange(n_layers).repeat_interleave(n_positions), counts.flatten())
    position = torch.repeat_interleave(torch.arange(n_positions).repeat(n_layers), counts.flatten())
    n = len(layer)
    features = ActiveFeatures(layer, position, torch.randint(0, 1000, (n,), generator=g), torch.rand(n, generator=g))
    error_positions = torch.ones(n_positions, dtype=torch.bool)
    error_positions[0] = False
    layout = build_layout(features, n_layers, error_positions, n_logits, n_positions - 1)
    expanded = torch.rand(n, generator=g) < expanded_share
    rows = expanded.nonzero().flatten()
    rows = rows[torch.randperm(len(rows), generator=g)]
    targets = layout.target_nodes

    def values(row_ids, width):
        target_position = layout.position[targets[row_ids]]
        reach = layout.position[:width][None, :] <= target_position[:, None]
        sparse = torch.rand(len(row_ids), width, generator=g) < 0.7
        return (torch.randn(len(row_ids), width, generator=g) * reach * sparse).to(dtype)

    blocks = [RowBlock(torch.arange(n, n + n_logits), values(torch.arange(n, n + n_logits), layout.n_sources))]
    for chosen in rows.split(batch):
        for target_layer in layer[chosen].unique().tolist():
            ids = chosen[layer[chosen] == target_layer]
            blocks.append(RowBlock(ids, values(ids, layout.prefix_end(target_layer))))
    if odd_widths and n:  # rows over a prefix that ends inside a layer: only some of a group's members in it
        ids = rows[:2]
        for width in torch.randint(1, layout.n_sources, (3,), generator=g).tolist():
            blocks.append(RowBlock(ids, values(ids, width)))
    weights = torch.softmax(torch.randn(n_logits, generator=g), 0)
    return layout, features, expanded, blocks, weights


def copies(blocks):
    return [RowBlock(b.rows.clone(), b.values.clone()) for b in blocks]


# --- the same answers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_gives_the_groups_and_values_of_the_loop(seed, dtype):
    layout, f, expanded, blocks, _ = random_trace(seed, n_layers=5, n_positions=12, dtype=dtype)
    expected_blocks = copies(blocks)
    expected = reference_fold(expected_blocks, layout, f.layer, f.position, expanded)
    groups = fold_remainders(blocks, layout, f.layer, f.position, expanded)
    assert len(groups) > 40
    assert [(g.node, g.layer, g.position) for g in groups] == [e[:3] for e in expected]
    for group, (*_, members) in zip(groups, expected, strict=True):
        assert group.features.tolist() == members.tolist()
    for got, want in zip(blocks, expected_blocks, strict=True):
        assert torch.equal(got.rows, want.rows) and got.values.dtype == dtype
        # the same columns are zeroed; sums differ at most by float32 round-off (then rounded like the loop's)
        assert torch.equal(got.values == 0, want.values == 0)
        if dtype == torch.float32:
            torch.testing.assert_close(got.values, want.values, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(got.values.float(), want.values.float(), rtol=2 ** -7, atol=1e-6)


def test_groups_whose_members_are_partly_inside_a_row_fold_into_their_first_member_inside():
    # nodes: 2 tokens | layer 0: features 2, 3, 4 (position 1) | logit 5; rows of width 4 see features 2 and 3 only
    features = ActiveFeatures(torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1]), torch.arange(3), torch.ones(3))
    layout = build_layout(features, 1, torch.tensor([False, False]), 1, 1)
    expanded = torch.tensor([False, False, False])
    blocks = [RowBlock(torch.tensor([3]), torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])),
              RowBlock(torch.tensor([3]), torch.tensor([[1.0, 2.0, 3.0, 4.0]])),
              RowBlock(torch.tensor([3]), torch.tensor([[1.0, 2.0, 3.0]]))]
    groups = fold_remainders(blocks, layout, features.layer, features.position, expanded)
    assert [(g.node, g.features.tolist()) for g in groups] == [(2, [0, 1, 2])]
    assert [b.values.tolist() for b in blocks] == [[[1.0, 2.0, 12.0, 0.0, 0.0]], [[1.0, 2.0, 7.0, 0.0]],
                                                   [[1.0, 2.0, 3.0]]]


def test_nothing_to_fold():
    layout, f, expanded, blocks, _ = random_trace(0)
    before = copies(blocks)
    assert fold_remainders(blocks, layout, f.layer, f.position, torch.ones_like(expanded)) == []
    assert all(torch.equal(a.values, b.values) for a, b in zip(blocks, before, strict=True))
    remainders = Remainders(layout, f.layer, f.position, torch.ones_like(expanded))
    assert not remainders.folded_away(layout.n_nodes).any()


@pytest.mark.parametrize("seed", range(3))
def test_remainder_influence_and_folded_nodes_match_the_loop(seed):
    layout, f, expanded, blocks, weights = random_trace(seed, n_layers=5, n_positions=12)
    influence = node_influence(blocks, layout, weights)
    remainders = Remainders(layout, f.layer, f.position, expanded)
    groups = remainders.groups
    got = remainder_influence(influence, layout, groups)
    torch.testing.assert_close(got, reference_remainder_influence(influence, layout, groups), rtol=1e-6, atol=1e-9)
    away = torch.zeros(layout.n_nodes, dtype=torch.bool)
    for group in groups:
        away[layout.feature_node[group.features[1:]]] = True
    assert torch.equal(remainders.folded_away(layout.n_nodes), away)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("node_threshold, edge_threshold", [(0.8, 0.98), (0.6, 0.7), (0.5, 0.4)])
def test_pruning_gives_the_graph_of_the_round_by_round_loop(seed, node_threshold, edge_threshold):
    layout, f, expanded, blocks, weights = random_trace(seed, n_layers=6, n_positions=10, odd_widths=False)
    influence = node_influence(blocks, layout, weights)
    remainders = Remainders(layout, f.layer, f.position, expanded)
    remainders.fold(blocks)
    folded_away = remainders.folded_away(layout.n_nodes)
    chosen = remainder_influence(influence, layout, remainders.groups)
    got = prune(copies(blocks), layout, weights, node_threshold, edge_threshold, folded_away, influence=chosen)
    keep, expected, rounds = reference_prune(copies(blocks), layout, weights, node_threshold, edge_threshold,
                                             folded_away, chosen)
    assert torch.equal(got.node_mask, keep)
    assert len(got.blocks) == len(expected)
    for a, b in zip(got.blocks, expected, strict=True):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.values, b.values)
    assert torch.equal(got.influence, chosen)
    if (node_threshold, edge_threshold) == (0.5, 0.4):
        assert rounds >= 1  # dead ends were dropped (see the chain below for many rounds)


def _chain(n_layers):
    """Two chains of one feature per layer (position 0; features 2l (chain A) and 2l + 1 (chain B) at layer l),
    each feature reading only the one below it (layer 0: the token). Chain A's top feeds 10 logits of weight 0.01
    each, chain B's top one logit of weight 0.9. Every edge of chain A scores 0.1 and of chain B 0.9; an edge
    threshold of 0.95 keeps those and cuts A's ten 0.01 edges to the logits, so chain A is a dead end n layers
    deep: the loop dropped it one layer per round."""
    layer = torch.arange(n_layers).repeat_interleave(2)
    features = ActiveFeatures(layer, torch.zeros(2 * n_layers, dtype=torch.long), torch.arange(2 * n_layers),
                              torch.ones(2 * n_layers))
    layout = build_layout(features, n_layers, torch.tensor([False]), 11, 0)
    node = layout.feature_node
    blocks = []
    for target_layer in range(n_layers):
        values = torch.zeros(2, layout.prefix_end(target_layer))
        if target_layer:
            values[0, node[2 * target_layer - 2]] = 1.0
            values[1, node[2 * target_layer - 1]] = 1.0
        else:
            values[:, 0] = 1.0
        blocks.append(RowBlock(torch.tensor([2 * target_layer, 2 * target_layer + 1]), values))
    logits = torch.zeros(11, layout.n_sources)
    logits[:10, node[2 * n_layers - 2]] = 1.0
    logits[10, node[2 * n_layers - 1]] = 1.0
    blocks.append(RowBlock(torch.arange(2 * n_layers, 2 * n_layers + 11), logits))
    weights = torch.tensor([0.01] * 10 + [0.9])
    return layout, blocks, weights


def _prune_chain(n_layers):
    layout, blocks, weights = _chain(n_layers)
    return prune(blocks, layout, weights, 1.0, 0.95, torch.zeros(layout.n_nodes, dtype=torch.bool)), layout


def test_dead_ends_that_cascade_over_many_layers_are_all_dropped():
    layout, blocks, weights = _chain(8)
    none = torch.zeros(layout.n_nodes, dtype=torch.bool)
    keep, expected, rounds = reference_prune(copies(blocks), layout, weights, 1.0, 0.95, none,
                                             node_influence(blocks, layout, weights))
    assert rounds == 8
    pruned, _ = _prune_chain(8)
    assert torch.equal(pruned.node_mask, keep)
    assert pruned.node_mask[layout.feature_node].tolist() == [False, True] * 8  # chain A gone, chain B kept
    assert len(pruned.blocks) == len(expected) == 9
    for a, b in zip(pruned.blocks, expected, strict=True):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.values, b.values)


# --- bounded work -------------------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations (ATen calls) run inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _fold_ops(n_positions):
    """Operations of Remainders (grouping, folded nodes, remainder influence) and folding blocks of the same
    widths, on a layout with 3 layers x ``n_positions`` remainder groups."""
    layout, f, expanded, _, weights = random_trace(0, n_layers=3, n_positions=n_positions, per_site=(3, 3),
                                                   expanded_share=0.0)
    expanded[layout.layer[layout.feature_node] == 2] = True  # layer 2: rows, no remainders
    ids = expanded.nonzero().flatten()[:4]
    widths = [layout.prefix_end(2), layout.n_sources, layout.prefix_end(1)]
    blocks = [RowBlock(ids, torch.randn(len(ids), width)) for width in widths * 3]  # 9 blocks, 3 widths
    influence = torch.rand(layout.n_nodes)
    with OpCounter() as counter:
        remainders = Remainders(layout, f.layer, f.position, expanded)
        remainders.fold(blocks)
        remainders.folded_away(layout.n_nodes)
        remainder_influence(influence, layout, remainders.groups)
    assert len(remainders.groups) == 2 * n_positions
    return counter.count


def test_folding_work_does_not_grow_with_the_number_of_groups():
    assert _fold_ops(5) == _fold_ops(500)  # 10 groups and 1,000 groups: the same operations


def _prune_ops(n_layers):
    with OpCounter() as counter:
        _prune_chain(n_layers)
    return counter.count


def test_dropping_dead_ends_takes_one_sweep_whatever_the_depth():
    # a dead end n layers deep took n rounds over all n blocks (quadratic in the depth); one sweep is linear: each
    # further layer (one more block) adds the same operations
    per_layer = (_prune_ops(16) - _prune_ops(8)) / 8
    assert (_prune_ops(24) - _prune_ops(16)) / 8 == per_layer
    assert per_layer <= 200  # about 160 operations per block
