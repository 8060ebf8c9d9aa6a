"""The JumpReLU copy of a TopK set keeps every tensor, adds one threshold per layer, and fires k features per
token on average on the calibration text (exactly, when no two pre-activations tie)."""

from __future__ import annotations

import pytest
import torch

from dictionaries.assembly import random_dictionary_set
from dictionaries.config import ActivationConfig
from dictionaries.errors import CircuitscopeError
from dictionaries.jumprelu_calibration import jumprelu_copy
from dictionaries.models.hook_sites import record_mlp_io

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_the_copy_fires_k_features_per_token_on_its_calibration_text(tiny_lm):
    lm, k = tiny_lm, 3
    dicts = random_dictionary_set(lm.n_layers, lm.d_model, 16, activation=ActivationConfig(type="topk", k=k),
                                  skip=True, seed=7)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, lm.model.config.vocab_size, (4, 10), generator=gen)
    ids[:, 0] = lm.tokenizer.bos_token_id
    copy = jumprelu_copy(dicts, lm, ids)
    assert copy.config.activation.type == "jumprelu"
    rec = record_mlp_io(lm, ids, with_logits=False)
    for layer in range(lm.n_layers):
        original, tensors = dicts.layer_tensors(layer), copy.layer_tensors(layer)
        for name, value in original.items():
            assert torch.equal(tensors[name], value), name
        assert tensors["threshold"].unique().numel() == 1
        x = rec.inputs[layer][:, 1:].reshape(-1, lm.d_model)
        fired = (copy.encode(layer, x) > 0).sum(-1).float().mean()
        assert fired == pytest.approx(k, abs=1e-6)


def test_only_topk_sets_get_a_copy(tiny_lm):
    jumprelu = random_dictionary_set(tiny_lm.n_layers, tiny_lm.d_model, 8, seed=1)
    with pytest.raises(CircuitscopeError, match="TopK"):
        jumprelu_copy(jumprelu, tiny_lm, torch.ones(1, 4, dtype=torch.long))
