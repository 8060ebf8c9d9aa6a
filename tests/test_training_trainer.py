"""The trainer: every kind and sparsity trains on the tiny model, the saved set acts on raw activations,
and the pieces (sparse TopK gradients, JumpReLU STE, AuxK, matryoshka) do what their docstrings say."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import fast_config

from dictionaries.evaluation import evaluate, held_out_contexts
from dictionaries.formats.native import load_native
from dictionaries.training import FvuSums, train
from dictionaries.training.distributed import DistributedContext
from dictionaries.training.jumprelu_ste import jumprelu, step
from dictionaries.training.losses import auxk_loss, fvu, l0_penalty
from dictionaries.training.sparsity import encode
from dictionaries.training.step import reconstruct
from dictionaries.training.trainable import TrainableDictionaries
from dictionaries.training.trainer import trained_dictionary_set

pytestmark = pytest.mark.usefixtures("single_thread")

K, TARGET_L0, WIDTH = 16, 16, 128
KINDS = [
    ("transcoder", "topk", {}),
    ("skip-transcoder", "topk", {}),
    ("clt", "topk", {}),
    ("clt", "jumprelu", {"clt_skip": True}),
    ("transcoder", "batchtopk", {}),
    ("skip-transcoder", "jumprelu", {}),
]


def _train_and_evaluate(tiny_lm, tiny_checkpoint_dir, text_file, out, **overrides):
    config = fast_config(tiny_checkpoint_dir, text_file, out, width=WIDTH, k=K, tokens=30_000, **overrides)
    result = train(config, tiny_lm)
    assert result.finished and result.step == config.total_steps
    dicts = load_native(out)
    contexts, _ = held_out_contexts(dicts, tiny_lm, None, 600)
    return config, dicts, evaluate(dicts, tiny_lm, contexts, batch_size=8)


@pytest.mark.parametrize("kind, activation, extra", KINDS, ids=[f"{k}-{a}{'-skip' if e else ''}" for k, a, e in KINDS])
def test_each_kind_and_sparsity_trains(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path, kind, activation, extra):
    if activation == "jumprelu":
        extra = {**extra, "target_l0": TARGET_L0}
    config, dicts, report = _train_and_evaluate(
        tiny_lm, tiny_checkpoint_dir, text_file, tmp_path / "out", kind=kind, activation=activation, **extra)
    assert dicts.kind == kind and dicts.has_skip == config.has_skip and dicts.widths == [WIDTH] * 4
    assert dicts.config.activation.type == ("topk" if activation == "topk" else "jumprelu")
    assert report.total.fvu < 0.5, report  # from 1.0 (the mean) at the start
    assert all(layer.fvu < 0.6 for layer in report.layers), report
    l0 = [layer.l0 for layer in report.layers]
    if activation == "topk":
        assert all(K - 0.5 <= v <= K for v in l0), l0  # exactly k, less only where a top value is <= 0
    else:  # BatchTopK (calibrated threshold) and JumpReLU (target-L0 penalty) land near their targets
        assert all(K / 2 <= v <= 2 * K for v in l0), l0
    summary = json.loads((tmp_path / "out" / "training.json").read_text())
    assert summary["steps"] == config.total_steps and summary["last_batch"]["fvu_total"] < 0.5
    assert not (tmp_path / "out" / "checkpoint").exists()


def _prefix_fvu(dicts, tiny_lm, contexts, size):
    """FVU of every layer's reconstruction from its first ``size`` features only (pooled over layers)."""
    from dictionaries.models.hook_sites import record_mlp_io

    rec = record_mlp_io(tiny_lm, contexts, with_logits=False)
    inputs = [rec.inputs[L][:, 1:] for L in range(4)]
    features = [dicts.encode(L, x) for L, x in enumerate(inputs)]
    for f in features:
        f[..., size:] = 0
    outputs = dicts.decode(features, inputs)
    sums = FvuSums.zeros(4, tiny_lm.d_model)
    sums.add(rec.outputs[:, :, 1:].reshape(4, -1, tiny_lm.d_model),
             torch.stack(outputs).reshape(4, -1, tiny_lm.d_model))
    return sums.total()


def test_matryoshka_prefixes_reconstruct_on_their_own(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path):
    _, nested, report = _train_and_evaluate(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path / "m",
                                            matryoshka=[16, 128])
    _, flat, _ = _train_and_evaluate(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path / "f")
    assert nested.config.metadata["matryoshka"] == "16,128" and report.total.fvu < 0.5
    contexts, _ = held_out_contexts(nested, tiny_lm, None, 600)
    nested_prefix, flat_prefix = _prefix_fvu(nested, tiny_lm, contexts, 16), _prefix_fvu(flat, tiny_lm, contexts, 16)
    assert nested_prefix < 0.75 and nested_prefix < flat_prefix - 0.1, (nested_prefix, flat_prefix)


@pytest.mark.parametrize("kind, activation, skip", [("skip-transcoder", "topk", False), ("clt", "jumprelu", True),
                                                    ("transcoder", "jumprelu", False)])
def test_saved_set_acts_on_raw_activations(tmp_path, kind, activation, skip):
    """Normalisation folded into the weights: the saved set's FVU on raw activations equals the
    training-space FVU, and its outputs are the training-space outputs divided by the output scale."""
    config = fast_config("unused", "model", tmp_path, kind=kind, activation=activation, width=16, clt_skip=skip)
    L, D, N = 3, 8, 200
    gen = torch.Generator().manual_seed(0)
    model = TrainableDictionaries(config, [0, 1, 2], D)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if model.log_threshold is not None:
            model.log_threshold.copy_(torch.randn(L, 16, generator=gen) * 0.3 - 1.5)
        model.in_scale.copy_(torch.tensor([0.5, 2.0, 7.0]))
        model.out_scale.copy_(torch.tensor([3.0, 0.25, 1.5]))
    x_raw, y_raw = torch.randn(L, N, D, generator=gen) * 4, torch.randn(L, N, D, generator=gen) * 2
    x, y = x_raw * model.in_scale.view(-1, 1, 1), y_raw * model.out_scale.view(-1, 1, 1)
    with torch.no_grad():
        code = encode(model, x, config, DistributedContext(), None, 0, N)
        y_hat = reconstruct(model, code, x, [16])[-1]
    dicts = trained_dictionary_set(config, [model.layer_tensors(i, activation) for i in range(L)], [0, 1, 2], D)
    _, outputs = dicts([x_raw[i] for i in range(L)])
    for i in range(L):
        torch.testing.assert_close(outputs[i] * model.out_scale[i], y_hat[i], rtol=1e-4, atol=1e-4)
        assert fvu(y_raw[i], outputs[i]) == pytest.approx(fvu(y[i], y_hat[i]), rel=1e-5)


def test_sparse_topk_gradients_equal_dense_autograd(tmp_path):
    config = fast_config("unused", "model", tmp_path, width=24, k=5)
    gen = torch.Generator().manual_seed(1)
    model = TrainableDictionaries(config, [0, 1], 6)
    with torch.no_grad():
        model.b_enc.copy_(torch.randn(2, 24, generator=gen))
    x = torch.randn(2, 30, 6, generator=gen)
    dead = torch.rand(2, 24, generator=gen) < 0.5
    weights, aux_weights = torch.randn(2, 30, 5, generator=gen), torch.randn(2, 30, 3, generator=gen)

    code = encode(model, x, config, DistributedContext(), dead, 3, 30)
    ((code.values * weights).sum() + (code.aux_values * aux_weights).sum()).backward()
    sparse = (model.W_enc.grad.clone(), model.b_enc.grad.clone())
    model.zero_grad()
    z = model.pre_activations(x)
    values, indices = z.topk(5, dim=-1)
    aux_values, aux_indices = z.masked_fill(~dead.unsqueeze(1), float("-inf")).topk(3, dim=-1)
    assert torch.equal(indices, code.indices) and torch.equal(aux_indices, code.aux_indices)
    ((values.relu() * weights).sum() + (aux_values.relu() * aux_weights).sum()).backward()
    torch.testing.assert_close(sparse[0], model.W_enc.grad)
    torch.testing.assert_close(sparse[1], model.b_enc.grad)


def test_jumprelu_straight_through_gradients():
    z = torch.tensor([0.10, 0.48, 0.52, 0.90], requires_grad=True)
    theta = torch.tensor([0.5], requires_grad=True)
    out = jumprelu(z, theta, 0.1)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.52, 0.90])
    out.sum().backward()
    assert z.grad.tolist() == [0.0, 0.0, 1.0, 1.0]
    # -(theta / eps) * K((z - theta) / eps): two values fall inside the window |z - theta| < eps / 2
    assert theta.grad.item() == pytest.approx(-2 * 0.5 / 0.1)
    theta.grad = None
    l0 = step(z, theta, 0.1)
    assert l0.tolist() == [0.0, 0.0, 1.0, 1.0]
    l0.sum().backward()
    assert theta.grad.item() == pytest.approx(-2 / 0.1)


def test_l0_penalties():
    local = torch.tensor([6.0, 20.0], requires_grad=True)  # one rank: local share = global mean L0
    loss, value = l0_penalty(local, local.detach(), 0.5, None)  # plain: coef * L0
    loss.backward()
    assert value == pytest.approx(13.0) and local.grad.tolist() == [0.5, 0.5]
    local.grad = None
    loss, value = l0_penalty(local, local.detach(), 2.0, 10.0)  # target: coef * |L0 / target - 1|
    loss.backward()
    assert value == pytest.approx(2.0 * (0.4 + 1.0)) and local.grad.tolist() == pytest.approx([-0.2, 0.2])


def test_auxk_trains_only_dead_features(tmp_path):
    config = fast_config("unused", "model", tmp_path, width=12, k=3)
    model = TrainableDictionaries(config, [0], 4)
    dead = torch.zeros(1, 12, dtype=torch.bool)
    dead[0, [2, 5, 7]] = True
    x = torch.randn(1, 20, 4, generator=torch.Generator().manual_seed(3))
    code = encode(model, x, config, DistributedContext(), dead, 2, 20)
    assert set(code.aux_indices.unique().tolist()) <= {2, 5, 7}
    residual = torch.randn(1, 20, 4)
    auxk_loss(residual, model.decode_sparse(code.aux_values, code.aux_indices), DistributedContext()).backward()
    touched = model.W_dec_stacked.grad[0].abs().sum(-1) > 0
    assert touched.any() and set(touched.nonzero().flatten().tolist()) <= {2, 5, 7}
    encoder_touched = model.W_enc.grad[0].abs().sum(0) > 0
    assert set(encoder_touched.nonzero().flatten().tolist()) <= {2, 5, 7}


def test_training_a_few_layers(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path):
    config = fast_config(tiny_checkpoint_dir, text_file, tmp_path / "o", layers=[3, 1], tokens=512)
    train(config, tiny_lm)
    dicts = load_native(tmp_path / "o")
    assert dicts.n_layers == 2 and dicts.config.metadata["layers"] == "1,3"
    contexts, _ = held_out_contexts(dicts, tiny_lm, None, 60)
    assert [layer.layer for layer in evaluate(dicts, tiny_lm, contexts).layers] == [1, 3]
