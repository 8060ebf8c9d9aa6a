"""Tracing on the real Gemma 3 270M with random width-1024 per-layer transcoders (~20 active features per token
per layer): " Paris" is a logit target of "The capital of France is", and sampled edges of every kind in the
traced graph equal perturbations of the frozen replacement model (float32, 1e-3 relative).

Run with ``pytest -m real_model tests/test_real_trace.py``.
"""

from __future__ import annotations

import random

import pytest
import torch

from circuits.engine.clean_run import record_clean_run
from circuits.engine.replacement import build_replacement
from circuits.interventions.frozen_model import run_frozen
from circuits.settings import TraceSettings
from circuits.tracing import trace
from dictionaries.assembly import random_dictionary_set
from dictionaries.models.hook_sites import record_mlp_io
from dictionaries.models.tokenization import constant_positions

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
CALIBRATION = (
    "The history of the city began with a small settlement on the banks of the river, where traders from the "
    "north and the south met to exchange salt, wool and grain."
)
WIDTH, ACTIVE = 1024, 20


@pytest.fixture(scope="module")
def transcoders(real_lm):
    """Random JumpReLU transcoders, one threshold per layer leaving ~ACTIVE features on per token (as in
    benchmarks/attribution.py::calibrated_transcoders), with a non-zero b_dec."""
    lm = real_lm
    dicts = random_dictionary_set(lm.n_layers, lm.d_model, WIDTH, seed=0, model=lm.name)
    inputs = record_mlp_io(lm, lm.tokenize(CALIBRATION), with_logits=False).inputs[:, 0, 1:].float()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in range(lm.n_layers):
            pre = dicts.pre_activations(layer, inputs[layer])
            threshold = pre.flatten().topk(pre.shape[0] * ACTIVE).values[-1].item()
            dicts.activation(layer).threshold.fill_(max(threshold, 0.0))
            dicts.decoder_bias(layer).copy_(0.1 * torch.randn(lm.d_model, generator=gen))
    return dicts


@pytest.fixture(scope="module")
def graph(real_lm, transcoders):
    return trace(real_lm, transcoders, PROMPT, TraceSettings(batch_size=128))


def test_paris_is_a_logit_target(real_lm, graph):
    tokens = [graph.graph.nodes[n]["token"] for n in graph.logit_nodes]
    assert " Paris" in tokens
    meta = graph.metadata
    assert meta.token_ids == [2, 818, 5279, 529, 7001, 563]
    per_token_layer = meta.n_active_features / ((len(meta.token_ids) - 1) * real_lm.n_layers)
    assert 5 <= per_token_layer <= 60, per_token_layer
    assert graph.nodes_of_kind("feature") and graph.nodes_of_kind("error")


def test_sampled_edges_of_every_kind_equal_perturbations(real_lm, transcoders, graph):
    lm, dicts = real_lm, transcoders
    G = graph.graph
    ids = lm.tokenize(PROMPT)
    clean = record_clean_run(lm, ids)
    replacement = build_replacement(clean, dicts, constant_positions(lm, ids, PROMPT, False).to(lm.device))
    f = replacement.features
    feature_number = {
        (int(L), int(i), int(p)): k for k, (L, i, p) in enumerate(zip(f.layer, f.index, f.position, strict=True))
    }
    P = clean.n_positions
    W_U = lm.lm_head.weight.float()
    mean_row = W_U.mean(0)

    def scales(node: str):
        emb, feat, err = torch.ones(P), torch.ones(len(f)), torch.ones(lm.n_layers, P)
        d = G.nodes[node]
        if d["kind"] == "token":
            emb[d["position"]] = 0
        elif d["kind"] == "feature":
            feat[feature_number[(d["layer"], d["feature"], d["position"])]] = 0
        else:
            err[d["layer"], d["position"]] = 0
        return emb, feat, err

    def target_value(out, node: str) -> float:
        d = G.nodes[node]
        if d["kind"] == "feature":
            encoder = dicts.encoder_weight(d["layer"])[:, d["feature"]].float()
            return float(out.mlp_inputs[d["layer"], d["position"]] @ encoder)
        return float(out.final_hidden[d["position"]] @ (W_U[d["token_id"]] - mean_row))

    base = run_frozen(lm, clean, replacement, dicts)
    for node in graph.logit_nodes:  # the frozen run reproduces the traced values
        assert target_value(base, node) == pytest.approx(G.nodes[node]["value"], rel=1e-4, abs=1e-3)

    # sources with edges into both features and logits, per kind
    rng = random.Random(0)
    chosen = []
    for kind, count in (("token", 2), ("feature", 3), ("error", 3)):
        nodes = [n for n in graph.nodes_of_kind(kind)
                 if {G.nodes[t]["kind"] for t in G.successors(n)} >= {"feature", "logit"}]
        assert nodes, f"no {kind} node has edges into features and logits"
        chosen += rng.sample(nodes, min(count, len(nodes)))
    scale = max(abs(d["weight"]) for _, _, d in G.edges(data=True))
    checked: dict[tuple[str, str], int] = {}
    for source in chosen:
        out = run_frozen(lm, clean, replacement, dicts, *scales(source))
        for target in G.successors(source):
            weight = G.edges[source, target]["weight"]
            delta = target_value(base, target) - target_value(out, target)
            assert delta == pytest.approx(weight, rel=1e-3, abs=1e-4 * scale), (source, target, weight, delta)
            key = (G.nodes[source]["kind"], G.nodes[target]["kind"])
            checked[key] = checked.get(key, 0) + 1
    for key in [(s, t) for s in ("token", "feature", "error") for t in ("feature", "logit")]:
        assert checked.get(key, 0) > 0, checked
