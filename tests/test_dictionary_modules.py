"""The dictionary modules compute what their docstrings say, checked against math written out here."""

import pytest
import torch

from dictionaries.activations import BatchTopK, JumpReLU, ReLU, TopK, build_activation
from dictionaries.assembly import random_dictionary_set
from dictionaries.config import ActivationConfig, DictionaryConfig
from dictionaries.errors import DictionaryMismatchError

N_LAYERS, D_MODEL, WIDTH = 3, 8, 12


def _randomise_biases(dicts, seed=1):
    """Non-zero biases, thresholds and skips so that every term of the math is exercised."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in dicts.named_parameters():
        if {"b_enc", "b_dec"} & set(name.split(".")):
            p.data = torch.randn(p.shape, generator=gen) * 0.3
        if name.endswith("threshold"):
            p.data = torch.rand(p.shape, generator=gen) * 0.5
    return dicts


def test_jumprelu_matches_gemma_scope_definition():
    z = torch.randn(4, 6)
    threshold = torch.rand(6)
    expected = torch.relu(z) * (z > threshold)
    assert torch.equal(JumpReLU(threshold)(z), expected)


def test_relu_and_build_activation():
    z = torch.randn(5, 7)
    assert torch.equal(ReLU()(z), torch.relu(z))
    assert isinstance(build_activation(ActivationConfig(type="topk", k=2), 7), TopK)
    with pytest.raises(ValueError, match="needs k"):
        ActivationConfig(type="topk")
    with pytest.raises(ValueError, match="takes no k"):
        ActivationConfig(type="relu", k=3)


def test_topk_keeps_the_k_largest_per_token():
    z = torch.randn(10, 20) + 3.0  # all positive: exactly k survive
    out = TopK(4)(z)
    assert ((out != 0).sum(-1) == 4).all()
    kth = z.topk(4, dim=-1).values[:, -1:]
    assert torch.equal(out, torch.where(z >= kth, z, torch.zeros_like(z)))


def test_batchtopk_mean_l0_is_k_in_training_and_threshold_in_eval():
    act = BatchTopK(k=3, threshold=0.5)
    z = torch.randn(2, 8, 20) + 2.0
    act.train()
    out = act(z)
    assert (out != 0).sum().item() == 3 * 16
    assert (out != 0).sum(-1).float().std() > 0  # tokens get different counts
    act.eval()
    assert torch.equal(act(z), torch.relu(z) * (z > 0.5))
    jr = act.to_jumprelu(20)
    assert torch.equal(jr(z), act(z))


@pytest.mark.parametrize("skip", [False, True])
def test_per_layer_set_matches_hand_math(skip):
    dicts = _randomise_biases(random_dictionary_set(N_LAYERS, D_MODEL, WIDTH, skip=skip, seed=3))
    xs = [torch.randn(2, 5, D_MODEL) for _ in range(N_LAYERS)]
    features, outputs = dicts(xs)
    for layer in range(N_LAYERS):
        t = dicts.layer_tensors(layer)
        z = xs[layer] @ t["W_enc"] + t["b_enc"]
        f = torch.relu(z) * (z > t["threshold"])
        y = f @ t["W_dec"] + t["b_dec"]
        if skip:
            y = y + xs[layer] @ t["W_skip"]
        torch.testing.assert_close(features[layer], f, rtol=0, atol=0)
        torch.testing.assert_close(outputs[layer], y, rtol=1e-6, atol=1e-6)
    assert dicts.kind == ("skip-transcoder" if skip else "transcoder")


@pytest.mark.parametrize("skip", [False, True])
def test_cross_layer_set_sums_every_earlier_source(skip):
    dicts = _randomise_biases(random_dictionary_set(N_LAYERS, D_MODEL, WIDTH, architecture="cross-layer", skip=skip))
    xs = [torch.randn(4, D_MODEL) for _ in range(N_LAYERS)]
    features, outputs = dicts(xs)
    for target in range(N_LAYERS):
        expected = dicts.layer_tensors(target)["b_dec"].expand(4, -1).clone()
        for source in range(target + 1):
            t = dicts.layer_tensors(source)
            assert t["W_dec"].shape == (WIDTH, N_LAYERS - source, D_MODEL)
            expected += features[source] @ t["W_dec"][:, target - source, :]
        if skip:
            expected += xs[target] @ dicts.layer_tensors(target)["W_skip"]
        torch.testing.assert_close(outputs[target], expected, rtol=1e-6, atol=1e-6)
    assert list(dicts.decoder_targets(1)) == [1, 2]
    with pytest.raises(IndexError):
        dicts.decoder_weight(2, 1)
    assert dicts.kind == "clt"


def test_skip_orientation_is_input_major():
    """x @ W_skip, not W_skip @ x: a non-symmetric skip and a one-hot input tell them apart."""
    dicts = random_dictionary_set(1, D_MODEL, WIDTH, skip=True, seed=5)
    w_skip = dicts.skip_weight(0)
    assert not torch.allclose(w_skip, w_skip.T)
    x = torch.zeros(1, D_MODEL)
    x[0, 2] = 1.0
    zero_features = [torch.zeros(1, WIDTH)]
    out = dicts.decode(zero_features, [x])[0] - dicts.decoder_bias(0)
    torch.testing.assert_close(out[0], w_skip[2])


def test_decode_requires_inputs_when_there_is_a_skip_path():
    dicts = random_dictionary_set(2, D_MODEL, WIDTH, skip=True)
    with pytest.raises(ValueError, match="skip path"):
        dicts.decode([torch.zeros(1, WIDTH)] * 2)


def test_check_fits_names_the_mismatch():
    dicts = random_dictionary_set(N_LAYERS, D_MODEL, WIDTH)
    dicts.check_fits(N_LAYERS, D_MODEL)
    with pytest.raises(DictionaryMismatchError, match="d_model 8 but gemma has d_model 640"):
        dicts.check_fits(N_LAYERS, 640, "gemma")
    with pytest.raises(DictionaryMismatchError, match="cover 3 layers but the model has 18"):
        dicts.check_fits(18, D_MODEL)


def test_config_validation():
    base = dict(architecture="per-layer", skip=False, n_layers=2, d_model=4, activation={"type": "relu"})
    DictionaryConfig(**base, widths=[3, 5])
    with pytest.raises(ValueError, match="2 layers"):
        DictionaryConfig(**base, widths=[3])
    with pytest.raises(ValueError, match=">= 1"):
        DictionaryConfig(**base, widths=[3, 0])
    with pytest.raises(ValueError, match="one width"):
        DictionaryConfig(**{**base, "architecture": "cross-layer"}, widths=[3, 5])
