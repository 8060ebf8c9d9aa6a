"""The replacement state (circuits.engine.replacement) keeps only what its users need: no dense [P, d_sae]
pre-activations, only the active features' values, which equal a direct encoding of the clean MLP inputs; and
the intervened runs that read them (features "linear" and "frozen") give the activations of the dense formula.

The dictionaries are wide (1024 features on d_model 32) with ~2% active, so that a per-layer [P, d_sae] tensor
would outweigh everything the state needs."""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import pytest
import torch
from conftest import PROMPT
from test_attribution_edges import make_dictionaries

from circuits.engine.clean_run import record_clean_run
from circuits.engine.replacement import Replacement, build_replacement
from circuits.interventions.feature_interventions import (
    InterventionSettings,
    _InterventionMlps,
    prepare_clean_state,
)
from dictionaries.models.tokenization import tokenize_prompt

WIDE = 1024
KINDS = {"transcoder": ("per-layer", False), "clt-skip": ("cross-layer", True)}

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def wide_dicts(tiny_lm):
    return {name: make_dictionaries(tiny_lm, arch, skip, seed=20 + i, width=WIDE, active_fraction=0.02)
            for i, (name, (arch, skip)) in enumerate(KINDS.items())}


def _replacement(lm, dicts):
    tokenized = tokenize_prompt(lm, PROMPT)
    clean = record_clean_run(lm, tokenized.ids[None])
    return clean, build_replacement(clean, dicts, tokenized.constant)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if is_dataclass(obj):
        return [t for f in fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_replacement_holds_no_dense_pre_activations(tiny_lm, wide_dicts, kind):
    clean, rep = _replacement(tiny_lm, wide_dicts[kind])
    n_layers, P, d = rep.errors.shape
    n = len(rep.features)
    assert 0 < n < 0.1 * n_layers * P * WIDE  # sparse: a dense [P, d_sae] per layer would dominate
    n_writes = sum(len(w.feature) for w in rep.writes)
    assert n_writes >= n  # every active feature writes at least to its own layer
    # errors and reconstruction [n_layers, P, d] float32; writes: feature, position (long) and a [d] float32 vector
    # per row; features: layer, position, index (long), activation and pre-activation (float32); constants [P] bool
    bound = 2 * n_layers * P * d * 4 + n_writes * (16 + 4 * d) + n * (24 + 8) + P
    held = sum(t.numel() * t.element_size() for t in _tensors(rep))
    assert held <= bound, f"{held} bytes held, {bound} needed ({n_layers * P * WIDE * 4} for dense pre-activations)"
    assert rep.feature_pre_activations.shape == (n,) and rep.feature_pre_activations.dtype == torch.float32


@pytest.mark.parametrize("kind", list(KINDS))
def test_feature_pre_activations_equal_a_direct_encoding(tiny_lm, wide_dicts, kind):
    dicts = wide_dicts[kind]
    clean, rep = _replacement(tiny_lm, dicts)
    f = rep.features
    for layer in range(tiny_lm.n_layers):
        direct = dicts.pre_activations(layer, clean.layers[layer].mlp_input).float()  # [P, d_sae]
        ids = rep.layer_slice(layer)
        assert ids.stop - ids.start == int((f.layer == layer).sum()) > 0
        assert (f.layer[ids] == layer).all()
        assert torch.equal(rep.feature_pre_activations[ids], direct[f.position[ids], f.index[ids]])
        # the activations are those pre-activations through the layer's activation function
        assert torch.equal(f.activation[ids], dicts.activation(layer)(direct)[f.position[ids], f.index[ids]])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["linear", "frozen", "recompute"])
def test_intervened_features_equal_the_dense_formula(tiny_lm, wide_dicts, kind, mode):
    """features(layer, x) for a live input x away from the clean one, against the dense formula:
    clean = act(pre_clean) at non-constant positions; linear: where(clean != 0, clean + pre - pre_clean, 0);
    frozen: clean; recompute: act(pre)."""
    dicts = wide_dicts[kind]
    tokenized = tokenize_prompt(tiny_lm, PROMPT)
    state = prepare_clean_state(tiny_lm, dicts, tokenized.ids, tokenized.constant)
    assert isinstance(state.replacement, Replacement)
    mlps = _InterventionMlps(dicts, state, [], InterventionSettings(features=mode))
    keep = (~tokenized.constant).float()[:, None]
    gen = torch.Generator().manual_seed(3)
    changed = 0
    for layer in range(tiny_lm.n_layers):
        x_clean = state.clean.layers[layer].mlp_input.float()
        x = x_clean + 0.3 * x_clean.std() * torch.randn(x_clean.shape, generator=gen)
        pre_clean, pre = dicts.pre_activations(layer, x_clean).float(), dicts.pre_activations(layer, x).float()
        act = dicts.activation(layer)
        clean = act(pre_clean) * keep
        expected = {"linear": torch.where(clean != 0, clean + pre - pre_clean, torch.zeros_like(clean)) * keep,
                    "frozen": clean, "recompute": act(pre) * keep}[mode]
        got = mlps.features(layer, x)
        assert got.shape == (len(tokenized.ids), WIDE)
        assert torch.equal(got, expected)
        changed += int((got != clean).sum())
    assert (changed == 0) == (mode == "frozen")
