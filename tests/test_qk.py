"""QK attribution (docs/design.md §3.11): an attention score split into pairs of sources at the query and the key.

Ground truth is the real Hugging Face attention module's own projections, q/k norms and rotary embedding, fed the
residual that :func:`circuits.interventions.frozen_model.run_frozen` produces entering the layer, with the input
norm and the q/k norms frozen at their clean RMS. The score is bilinear in (residual at the query, residual at the
key), so with S(X, Y) the score of the query from run X and the key from run Y, removing source i (run "-i") and
source j (run "-j"):

    S(all, all) - S(-i, all) = a_i . key                                   (i's query-side marginal)
    S(all, all) - S(-i, all) - S(all, -j) + S(-i, -j) = a_i . b_j          (the pair's contribution)
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from conftest import PROMPT
from test_attribution_edges import KINDS, make_dictionaries, source_scales

from circuits.attention.qk import AttentionQueries
from circuits.attention.state import state_for_prompt
from circuits.engine.attribution import attribute
from circuits.interventions.frozen_model import run_frozen
from circuits.settings import TraceSettings

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
SETTINGS = TraceSettings(batch_size=16)


@pytest.fixture(scope="module")
def cases(tiny_lm):
    out = {}
    for i, (name, (arch, skip)) in enumerate(KINDS.items()):
        dicts = make_dictionaries(tiny_lm, arch, skip, seed=i)
        state = state_for_prompt(tiny_lm, dicts, PROMPT, SETTINGS)
        out[name] = (dicts, attribute(tiny_lm, dicts, PROMPT, SETTINGS), state, AttentionQueries(state))
    return out


class ModelScores:
    """Scores of one layer's attention computed by the model's own modules on residuals of frozen runs."""

    def __init__(self, lm, dicts, att, layer: int):
        from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

        self.rope = apply_rotary_pos_emb
        self.lm, self.dicts, self.att, self.layer = lm, dicts, att, layer
        arch = lm.architecture
        self.module = lm.attention_module(layer)
        self.norm_in = lm.layer_module(layer, arch.attention_norm)
        self.r_in = att.clean.layers[layer].r_input
        seen = {}
        with ExitStack() as stack:
            stack.callback(self.module.register_forward_pre_hook(
                lambda m, a, k: seen.__setitem__("rotary", k["position_embeddings"]), with_kwargs=True).remove)
            self.clean_residual = self.residual({})
        self.cos, self.sin = seen["rotary"]
        # the q/k norms' RMS at the clean run, from the clean residual through the model's projections
        q, k = self._projected(self.clean_residual)
        eps = self.module.q_norm.eps
        self.r_q = torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps)
        self.r_k = torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps)

    def residual(self, scales: dict[int, float]) -> torch.Tensor:
        """[P, d]: the residual entering the layer in the frozen run with ``scales``."""
        seen = {}
        emb, feat, err = source_scales(self.lm, self.att, scales)
        with ExitStack() as stack:
            stack.callback(self.norm_in.register_forward_pre_hook(
                lambda m, a: seen.__setitem__("x", a[0][0].float())).remove)
            run_frozen(self.lm, self.att.clean, self.att.replacement, self.dicts, emb, feat, err)
        return seen["x"]

    def _projected(self, residual):
        x = self.lm.architecture.norm.frozen(self.norm_in, residual[None], self.r_in)
        P, hd = residual.shape[0], self.module.head_dim
        q = self.module.q_proj(x).view(1, P, -1, hd).transpose(1, 2)  # [1, H, P, hd]
        k = self.module.k_proj(x).view(1, P, -1, hd).transpose(1, 2)
        return q, k

    def scores(self, query_residual, key_residual) -> torch.Tensor:
        """[H, P, P] pre-softmax scores (query scaling included, no mask), q/k norms frozen."""
        q, _ = self._projected(query_residual)
        _, k = self._projected(key_residual)
        q = q * self.r_q * (1 + self.module.q_norm.weight)
        k = k * self.r_k * (1 + self.module.k_norm.weight)
        q, k = self.rope(q, k, self.cos, self.sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return (q @ k.transpose(-1, -2))[0] * self.module.scaling


@pytest.mark.parametrize("kind", list(KINDS))
def test_scores_and_patterns_are_the_models_own(tiny_lm, cases, kind):
    dicts, att, state, queries = cases[kind]
    for layer in range(tiny_lm.n_layers):
        scores, pattern = queries.attention_scores(layer)
        model = ModelScores(tiny_lm, dicts, att, layer)
        expected = model.scores(model.clean_residual, model.clean_residual)
        visible = torch.isfinite(scores)
        torch.testing.assert_close(scores[visible], expected[visible], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.softmax(scores, -1), pattern, rtol=1e-5, atol=1e-6)
        if layer % 2 == 0:  # sliding layers hide keys further back than the window (4)
            assert not visible[:, 10, 5].any() and visible[:, 10, 7].all()
        else:
            assert visible[:, 10, :11].all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_pairs_and_biases_sum_to_the_score(cases, kind):
    _, _, state, queries = cases[kind]
    for layer, head, query, key in [(0, 1, 5, 3), (1, 0, 12, 2), (2, 3, 11, 9), (3, 2, 12, 12), (3, 1, 8, 0),
                                    (2, 0, 12, 3)]:  # the last: outside layer 2's sliding window
        result = queries.attribute(layer, head, query, key, top=10**6)
        scores, pattern = queries.attention_scores(layer)
        assert result.masked == (not bool(torch.isfinite(scores[head, query, key])))
        assert result.masked == (layer % 2 == 0 and query - key >= 4)  # sliding layers 0 and 2, window 4
        if not result.masked:
            assert result.clean_score == pytest.approx(float(scores[head, query, key]), rel=1e-5, abs=1e-6)
        assert result.pattern == pytest.approx(float(pattern[head, query, key]), rel=1e-6)
        assert result.score == pytest.approx(result.clean_score, rel=1e-5, abs=1e-6)
        pairs = sum(p.weight for p in result.pairs)
        biases = sum(result.bias_terms[k] for k in ("query_sources*key_bias", "query_bias*key_sources", "bias*bias"))
        assert pairs + biases == pytest.approx(result.clean_score, rel=1e-5, abs=1e-6)
        q_side = sum(w for _, w in result.query_marginals) + result.bias_terms["query_bias*key"]
        k_side = sum(w for _, w in result.key_marginals) + result.bias_terms["query*key_bias"]
        assert q_side == pytest.approx(result.clean_score, rel=1e-5, abs=1e-6)
        assert k_side == pytest.approx(result.clean_score, rel=1e-5, abs=1e-6)
        # sources at the query come from layers below and positions up to it
        for name, _ in result.query_marginals:
            node = state.node(name)
            assert node.layer < layer and node.position <= query
        for name, _ in result.key_marginals:
            node = state.node(name)
            assert node.layer < layer and node.position <= key


@pytest.mark.parametrize("kind", ["transcoder", "skip-transcoder", "clt"])
def test_a_pair_is_the_bilinear_perturbation_and_a_marginal_the_one_sided_one(tiny_lm, cases, kind):
    dicts, att, state, queries = cases[kind]
    layer, head, query, key = 3, 1, 12, 7
    result = queries.attribute(layer, head, query, key, top=4)
    model = ModelScores(tiny_lm, dicts, att, layer)
    full = model.clean_residual
    scale = max(abs(p.weight) for p in result.pairs)
    for pair in result.pairs[:3] + [result.pairs[-1]]:
        i, j = state.node(pair.query_source).index, state.node(pair.key_source).index
        without_i, without_j = model.residual({i: 0.0}), model.residual({j: 0.0})

        def score(q_run, k_run):
            return float(model.scores(q_run, k_run)[head, query, key])

        bilinear = score(full, full) - score(without_i, full) - score(full, without_j) + score(without_i, without_j)
        assert pair.weight == pytest.approx(bilinear, rel=1e-4, abs=1e-5 * scale), pair
        marginal = dict(result.query_marginals)
        if pair.query_source in marginal:
            assert marginal[pair.query_source] == pytest.approx(score(full, full) - score(without_i, full),
                                                                rel=1e-4, abs=1e-5 * scale)
    assert scale > 1e-3


def test_neuronpedia_export_carries_qk_results_for_the_strongest_edges_targets(tiny_lm, cases, tmp_path):
    import json

    from circuits.attention.export import neuronpedia_qk
    from circuits.attention.heads import annotate_edges
    from circuits.graph.neuronpedia import neuronpedia_id, save_neuronpedia
    from circuits.tracing import trace

    dicts, _, state, queries = cases["skip-transcoder"]
    graph = trace(tiny_lm, dicts, PROMPT, SETTINGS)
    routes = annotate_edges(state, graph, top=30, n_heads=1)
    qk = neuronpedia_qk(state, graph, routes, n_nodes=3, top=5)
    assert len(qk) == 3
    path = save_neuronpedia(graph, tmp_path / "g.np.json", qk_tracing=qk)
    nodes = {n["node_id"]: n for n in json.loads(path.read_text())["nodes"]}
    with_qk = [n for n in nodes.values() if n["qk_tracing_results"] is not None]
    assert len(with_qk) == 3
    first = next(r for r in sorted(routes, key=lambda r: -abs(r.weight)))
    entry = nodes[neuronpedia_id(graph, first.target)]["qk_tracing_results"]
    layer, head, _ = first.heads[0]
    expected = queries.attribute(layer, head, state.node(first.target).position, state.node(first.source).position,
                                 top=5)
    assert [tuple(p) for p in entry["pair_wise_contributors"]] == [
        (neuronpedia_id(graph, p.query_source), neuronpedia_id(graph, p.key_source), pytest.approx(p.weight))
        for p in expected.pairs]
    assert entry["top_q_marginal_contributors"][0][1] == pytest.approx(expected.query_marginals[0][1])
    assert entry["top_k_marginal_contributors"][0][0] == neuronpedia_id(graph, expected.key_marginals[0][0])
    # graph nodes keep their export ids; sources outside the graph get the same form
    some = next(iter(graph.graph.nodes))
    assert neuronpedia_id(graph, some) in nodes
    assert neuronpedia_id(graph, "feature:2:5@7") == "2_5_7" and neuronpedia_id(graph, "error:1@3") == "1_-1_3"
