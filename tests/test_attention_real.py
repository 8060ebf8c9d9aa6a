"""Attention in the graph on the real Gemma 3 270M with the shipped dictionaries: in the graph of an indirect-object
prompt, the heads that move " Mary" information to the last position, and the QK pairs that explain their attention
to " Mary" (printed: run with ``-s``). Run with ``pytest -m real_model tests/test_attention_real.py -s``."""

from __future__ import annotations

import pytest
import torch

from circuits.attention.heads import edge_heads
from circuits.attention.qk import AttentionQueries
from circuits.attention.state import state_from_graph
from circuits.tracing import trace
from dictionaries.bundled import default_dictionaries_path
from dictionaries.formats.registry import load_dictionaries

pytestmark = pytest.mark.real_model
PROMPT = "When Mary and John went to the store, John gave a drink to"


def test_heads_moving_mary_to_the_last_position_and_why_they_attend(real_lm):
    dicts = load_dictionaries(default_dictionaries_path("gemma-3-270m"), dtype=real_lm.dtype)
    graph = trace(real_lm, dicts, PROMPT)
    state = state_from_graph(graph, real_lm, dicts)
    mary = state.tokens.index(" Mary")
    last = len(state.tokens) - 1
    logit = max(graph.logit_nodes, key=lambda n: graph.graph.nodes[n]["probability"])
    print(f"\ntarget {logit} {graph.graph.nodes[logit]['token']!r} p={graph.graph.nodes[logit]['probability']:.3f}")
    # every source at " Mary" (all of them, not only the graph's): their direct effects on the logit, split per head
    sources = [state.name(i) for i in range(state.layout.n_sources) if int(state.layout.position[i]) == mary]
    shares = edge_heads(state, logit, sources)
    total = float(shares.edge.sum())
    parts = shares.above.sum(1) + shares.residual.sum(1) + shares.heads.sum((1, 2))
    torch.testing.assert_close(parts, torch.full_like(parts, total), rtol=1e-4, atol=1e-4 * shares.edge.abs().sum())
    per_head = shares.heads.sum(2)  # [layers, H]
    order = per_head.flatten().abs().argsort(descending=True)[:6]
    H = state.n_heads
    top = [(shares.layers[i // H], i % H, float(per_head.flatten()[i])) for i in order.tolist()]
    print(f"direct effect of everything at ' Mary' (position {mary}) on the logit: {total:+.3f}")
    print("heads carrying it (layer.head: share):", ", ".join(f"L{L}.H{h} {v:+.3f}" for L, h, v in top))
    assert abs(top[0][2]) > 0.1 * abs(total)
    queries = AttentionQueries(state)
    for layer, head, _ in top[:3]:
        result = queries.attribute(layer, head, last, mary, top=8)
        assert result.score == pytest.approx(result.clean_score, rel=1e-4, abs=1e-4)
        print(f"L{layer}.H{head}: query {last} -> key {mary} score {result.score:+.3f} pattern {result.pattern:.3f}; "
              f"biases " + ", ".join(f"{k} {v:+.2f}" for k, v in list(result.bias_terms.items())[:3]))
        for pair in result.pairs[:6]:
            print(f"    {pair.weight:+8.3f}  {pair.query_source:<24} x {pair.key_source}")
        print("    query side: " + ", ".join(f"{n} {w:+.2f}" for n, w in result.query_marginals[:4]))
        print("    key side:   " + ", ".join(f"{n} {w:+.2f}" for n, w in result.key_marginals[:4]))
