"""Evaluation numbers against a hand computation: token loops for FVU, L0 and dead features, and a
layer-by-layer forward pass (``hand_forward`` of the hook-site tests) for the spliced CE and KL."""

from __future__ import annotations

import math

import pytest
import torch
from test_hook_sites import hand_forward

from dictionaries.assembly import build_dictionary_set, random_dictionary_set
from dictionaries.config import ActivationConfig
from dictionaries.evaluation import EvaluationReport, evaluate

pytestmark = pytest.mark.usefixtures("single_thread")

D, WIDTH = 32, 16


def _dictionaries(architecture, activation, skip, layers=None):
    """A random set with a few dead features (b_enc -100) and, for JumpReLU, positive thresholds."""
    n = len(layers) if layers else 4
    base = random_dictionary_set(n, D, WIDTH, architecture=architecture, activation=activation, skip=skip, seed=3)
    gen = torch.Generator().manual_seed(4)
    tensors = []
    for layer in range(n):
        t = {k: v.clone() for k, v in base.layer_tensors(layer).items()}
        t["W_dec"] *= 0.3
        t["b_enc"] = torch.randn(WIDTH, generator=gen) * 0.5
        t["b_enc"][:3] = -100.0  # never active
        if "threshold" in t:
            t["threshold"] = torch.rand(WIDTH, generator=gen) * 0.8
        tensors.append(t)
    config = base.config.model_copy(deep=True)
    if layers:
        config.metadata["layers"] = ",".join(map(str, layers))
    return build_dictionary_set(config, tensors, [f"<layer {i}>" for i in range(n)])


def _layer_by_hand(dicts, i, x, sources):
    """Dictionary layer i on one token x [D]: (features a_i, output). ``sources`` {s: a_s} holds the same
    token's features of layers s < i (read by a CLT) and receives a_i."""
    t = dicts.layer_tensors(i)
    z = x @ t["W_enc"] + t["b_enc"]
    if "threshold" in t:
        a = torch.where(z > t["threshold"], z, torch.zeros(())).relu()
    else:
        a = torch.zeros_like(z)
        top = z.topk(dicts.config.activation.k).indices
        a[top] = z[top].relu()
    sources[i] = a
    out = t["b_dec"] + (x @ t["W_skip"] if "W_skip" in t else 0)
    for s, a_s in sources.items():
        if dicts.kind == "clt":
            out = out + a_s @ dicts.layer_tensors(s)["W_dec"][:, i - s]
        elif s == i:
            out = out + a_s @ t["W_dec"]
    return a, out


def _hand_report(dicts, lm, ids, layers):
    """FVU, L0, dead per layer and CE / KL, with loops over tokens and a layer-by-layer forward."""
    B, S = ids.shape
    inputs, outputs, clean_logits = hand_forward(lm, ids)
    per_layer = {L: {"y": [], "y_hat": [], "active": 0, "fired": torch.zeros(WIDTH, dtype=torch.bool)} for L in layers}
    for b in range(B):
        for p in range(1, S):
            sources: dict[int, torch.Tensor] = {}
            for i, L in enumerate(layers):
                a, out = _layer_by_hand(dicts, i, inputs[L, b, p], sources)
                per_layer[L]["y"].append(outputs[L, b, p])
                per_layer[L]["y_hat"].append(out)
                per_layer[L]["active"] += int((a != 0).sum())
                per_layer[L]["fired"] |= a != 0
    metrics = {}
    for L, m in per_layer.items():
        y, y_hat = torch.stack(m["y"]).double(), torch.stack(m["y_hat"]).double()
        sse = sum(float((y[n] - y_hat[n]).pow(2).sum()) for n in range(len(y)))
        mean = y.mean(0)
        sst = sum(float((y[n] - mean).pow(2).sum()) for n in range(len(y)))
        metrics[L] = (sse / sst, m["active"] / len(y), float((~m["fired"]).double().mean()))

    replace: dict[int, torch.Tensor] = {}
    spliced_sources = [{} for _ in range(B * S)]
    for i, L in enumerate(layers):  # layer L's input depends on the replacements below it
        spliced_inputs, true_outputs, _ = hand_forward(lm, ids, replace)
        new = true_outputs[L].clone()
        for b in range(B):
            for p in range(1, S):
                _, new[b, p] = _layer_by_hand(dicts, i, spliced_inputs[L, b, p], spliced_sources[b * S + p])
        replace[L] = new
    spliced_logits = hand_forward(lm, ids, replace)[2]
    ce_clean = ce_spliced = kl = 0.0
    for b in range(B):
        for p in range(1, S):
            log_p = torch.log_softmax(clean_logits[b, p].double(), -1)
            log_q = torch.log_softmax(spliced_logits[b, p].double(), -1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            if p < S - 1:
                ce_clean -= float(log_p[ids[b, p + 1]])
                ce_spliced -= float(log_q[ids[b, p + 1]])
    return metrics, ce_clean / (B * (S - 2)), ce_spliced / (B * (S - 2)), kl / (B * (S - 1))


CASES = {
    "skip-transcoder-jumprelu": dict(architecture="per-layer", activation=ActivationConfig(type="jumprelu"), skip=True),
    "clt-topk": dict(architecture="cross-layer", activation=ActivationConfig(type="topk", k=4), skip=False),
    "clt-jumprelu-skip": dict(architecture="cross-layer", activation=ActivationConfig(type="jumprelu"), skip=True),
    "transcoder-layers-1-3": dict(architecture="per-layer", activation=ActivationConfig(type="jumprelu"), skip=False,
                                  layers=[1, 3]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_evaluation_matches_hand_computation(tiny_lm, name):
    dicts = _dictionaries(**CASES[name])
    layers = CASES[name].get("layers") or [0, 1, 2, 3]
    ids = torch.randint(6, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    report = evaluate(dicts, tiny_lm, ids, batch_size=2, data="random ids")
    assert isinstance(report, EvaluationReport) and report.tokens == 3 * 8 and report.contexts == 3
    metrics, ce_clean, ce_spliced, kl = _hand_report(dicts, tiny_lm, ids, layers)
    assert [r.layer for r in report.layers] == layers
    for row in report.layers:
        fvu, l0, dead = metrics[row.layer]
        assert row.fvu == pytest.approx(fvu, rel=1e-4)
        assert row.l0 == pytest.approx(l0) and row.dead_fraction == pytest.approx(dead)
        assert dead >= 3 / WIDTH  # the features with b_enc = -100 are dead
    assert report.total.l0 == pytest.approx(sum(m[1] for m in metrics.values()))
    assert report.total.dead_fraction == pytest.approx(sum(m[2] for m in metrics.values()) / len(layers))
    assert report.ce_clean == pytest.approx(ce_clean, rel=1e-4)
    assert report.ce_spliced == pytest.approx(ce_spliced, rel=1e-4)
    assert report.delta_ce == pytest.approx(ce_spliced - ce_clean, rel=1e-3, abs=1e-5)
    assert report.kl == pytest.approx(kl, rel=1e-3, abs=1e-6) and math.isfinite(report.kl)
    assert report.kl > 1e-3 and abs(report.delta_ce) > 1e-3  # the splice changes the model


def test_dictionaries_of_another_model_are_refused(tiny_lm):
    from dictionaries.errors import DictionaryMismatchError

    ids = torch.tensor([[2, 10, 11, 12]])
    with pytest.raises(DictionaryMismatchError, match="d_model 16 but .* has d_model 32"):
        evaluate(random_dictionary_set(4, 16, 8), tiny_lm, ids)
    with pytest.raises(DictionaryMismatchError, match="cover 3 layers but .* has 4"):
        evaluate(random_dictionary_set(3, D, 8), tiny_lm, ids)
    partial = _dictionaries("per-layer", ActivationConfig(type="jumprelu"), False, layers=[2, 9])
    with pytest.raises(DictionaryMismatchError, match=r"cover layers \[2, 9\] but .* has layers 0..3"):
        evaluate(partial, tiny_lm, ids)
