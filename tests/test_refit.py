"""Least-squares refit of per-layer decoders: it is the exact ridge solution of the normal equations, never
worse than the trained decoder on the fitted tokens, leaves the encoder (so every activation) alone, and keeps
the decoder row of a feature that never fires."""

from __future__ import annotations

import pytest
import torch

from dictionaries.assembly import random_dictionary_set
from dictionaries.config import ActivationConfig
from dictionaries.errors import CircuitscopeError
from dictionaries.formats.native import load_native, save_native
from dictionaries.models.hook_sites import record_mlp_io
from dictionaries.training.refit import refit_decoders

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _contexts(lm, n=6, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, lm.model.config.vocab_size, (n, length), generator=gen)
    ids[:, 0] = lm.tokenizer.bos_token_id
    return ids


def _data(lm, dicts, contexts):
    rec = record_mlp_io(lm, contexts, with_logits=False)
    d = lm.d_model
    return [(rec.inputs[L][:, 1:].reshape(-1, d).float(), rec.outputs[L][:, 1:].reshape(-1, d).float())
            for L in range(lm.n_layers)]


def _predict(dicts, layer, a, x):
    out = a @ dicts.decoder_weight(layer, layer) + dicts.decoder_bias(layer)
    return out if dicts.skip_weight(layer) is None else out + x @ dicts.skip_weight(layer)


@pytest.mark.parametrize("skip", [False, True])
def test_refit_is_the_least_squares_decoder(tiny_lm, tmp_path, skip):
    lm = tiny_lm
    dicts = random_dictionary_set(lm.n_layers, lm.d_model, 8, activation=ActivationConfig(type="topk", k=3),
                                  skip=skip, seed=3)
    path = save_native(dicts, tmp_path / "set")
    before = load_native(path)  # memory-mapped: the refit must not write into the files
    contexts = _contexts(lm)
    data = _data(lm, before, contexts)
    refit = refit_decoders(load_native(path), lm, contexts, batch_size=4, ridge=0.0)
    assert torch.equal(load_native(path).decoder_weight(0, 0), before.decoder_weight(0, 0))
    for layer, (x, y) in enumerate(data):
        assert torch.equal(refit.encode(layer, x), before.encode(layer, x))
        a = before.encode(layer, x)
        z = torch.cat([a] + ([x] if skip else []) + [torch.ones(len(x), 1)], dim=1).double()
        expected = torch.linalg.lstsq(z, y.double()).solution.float()
        width = dicts.widths[layer]
        torch.testing.assert_close(refit.decoder_weight(layer, layer), expected[:width], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(refit.decoder_bias(layer), expected[-1], rtol=1e-3, atol=1e-4)
        if skip:
            torch.testing.assert_close(refit.skip_weight(layer), expected[width:-1], rtol=1e-3, atol=1e-4)
        old = (_predict(before, layer, a, x) - y).square().sum()
        new = (_predict(refit, layer, a, x) - y).square().sum()
        assert new <= old * (1 + 1e-5), (layer, float(new), float(old))


def test_a_feature_that_never_fires_keeps_its_decoder_row(tiny_lm):
    lm = tiny_lm
    dicts = random_dictionary_set(lm.n_layers, lm.d_model, 8, skip=True, seed=4)
    with torch.no_grad():
        dicts.encoder_bias(1)[5] = -1e6  # feature 5 of layer 1 can never fire
    row = dicts.decoder_weight(1, 1)[5].clone()
    refit = refit_decoders(dicts, lm, _contexts(lm), ridge=1e-6)
    torch.testing.assert_close(refit.decoder_weight(1, 1)[5], row, rtol=1e-5, atol=1e-6)


def test_refit_refuses_clts_and_low_precision_sets(tiny_lm):
    clt = random_dictionary_set(tiny_lm.n_layers, tiny_lm.d_model, 8, architecture="cross-layer", seed=5)
    with pytest.raises(CircuitscopeError, match="CLT"):
        refit_decoders(clt, tiny_lm, _contexts(tiny_lm))
    bf16 = random_dictionary_set(tiny_lm.n_layers, tiny_lm.d_model, 8, seed=5, dtype=torch.bfloat16)
    with pytest.raises(CircuitscopeError, match="float32"):
        refit_decoders(bf16, tiny_lm, _contexts(tiny_lm))
