"""Hook sites: recordings equal the model's own computation, replacements are exact, hooks never leak."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT

from dictionaries.models.hook_sites import (
    MlpRecording,
    record_mlp_io,
    replace_mlp_outputs,
)

ATOL = 1e-5


def hand_forward(lm, input_ids, replace=None):
    """The decoder computed layer by layer with masks built here (causal; sliding: i - j < window).

    ``replace`` maps layer -> MLP contribution [B, S, D] used instead of the true one.
    Returns (mlp_inputs [N, B, S, D], mlp_outputs [N, B, S, D] (true ones), logits [B, S, V]).
    """
    text, config = lm.text_model, lm.config
    seq = input_ids.shape[1]
    h = text.embed_tokens(input_ids)
    positions = torch.arange(seq).unsqueeze(0)
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    allowed = {"full_attention": j <= i, "sliding_attention": (j <= i) & (i - j < config.sliding_window)}
    inputs, outputs = [], []
    for layer_index, layer in enumerate(lm.layers):
        kind = config.layer_types[layer_index]
        mask = torch.zeros(seq, seq).masked_fill(~allowed[kind], float("-inf"))[None, None]
        cos_sin = text.rotary_emb(h, positions, kind)
        attn, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=mask
        )
        h = h + layer.post_attention_layernorm(attn)
        x = layer.pre_feedforward_layernorm(h)
        y = layer.post_feedforward_layernorm(layer.mlp(x))
        inputs.append(x)
        outputs.append(y)
        h = h + (replace[layer_index] if replace and layer_index in replace else y)
    logits = lm.lm_head(text.norm(h))
    if config.final_logit_softcapping is not None:
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return torch.stack(inputs), torch.stack(outputs), logits


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module", params=["text", "multimodal"])
def lm(request, tiny_lm, tiny_mm_lm):
    return tiny_lm if request.param == "text" else tiny_mm_lm


def test_recording_shapes(lm):
    ids = lm.tokenize(PROMPT)
    rec = record_mlp_io(lm, ids)
    assert isinstance(rec, MlpRecording)
    assert rec.inputs.shape == rec.outputs.shape == (lm.n_layers, 1, ids.shape[1], lm.d_model)
    assert rec.logits.shape == (1, ids.shape[1], lm.config.vocab_size)
    assert not rec.inputs.requires_grad


def test_recording_equals_model_computation(lm):
    ids = lm.tokenize(PROMPT)
    rec = record_mlp_io(lm, ids)
    with torch.no_grad():
        for layer_index, layer in enumerate(lm.layers):
            own = layer.post_feedforward_layernorm(layer.mlp(rec.inputs[layer_index]))
            torch.testing.assert_close(rec.outputs[layer_index], own, rtol=0, atol=ATOL)
        inputs, outputs, logits = hand_forward(lm, ids)
        direct = lm.model(input_ids=ids).logits
    torch.testing.assert_close(rec.inputs, inputs, rtol=0, atol=ATOL)
    torch.testing.assert_close(rec.outputs, outputs, rtol=0, atol=ATOL)
    torch.testing.assert_close(rec.logits, logits, rtol=0, atol=ATOL)
    assert torch.equal(rec.logits, direct)


def test_sliding_window_matters(tiny_lm):
    """Sanity check of the tiny model: ignoring the window on sliding layers changes the result."""
    ids = tiny_lm.tokenize(PROMPT)
    assert ids.shape[1] > tiny_lm.config.sliding_window
    config = tiny_lm.config
    saved = config.sliding_window
    with torch.no_grad():
        _, _, windowed = hand_forward(tiny_lm, ids)
        try:
            config.sliding_window = 10_000
            _, _, unwindowed = hand_forward(tiny_lm, ids)
        finally:
            config.sliding_window = saved
    assert not torch.allclose(windowed, unwindowed, atol=1e-3)


def test_without_logits_gives_same_recordings(lm):
    ids = lm.tokenize(PROMPT)
    full = record_mlp_io(lm, ids)
    calls = []
    handle = lm.text_model.norm.register_forward_hook(lambda *args: calls.append(1))
    try:
        short = record_mlp_io(lm, ids, with_logits=False)
    finally:
        handle.remove()
    assert short.logits is None
    assert calls == []  # stopped before the final norm and the unembedding
    assert torch.equal(short.inputs, full.inputs)
    assert torch.equal(short.outputs, full.outputs)


def test_batched_and_padded_recording(tiny_lm):
    long_ids = tiny_lm.tokenize(PROMPT)
    short_ids = tiny_lm.tokenize("the cat was in the house and the dog")
    pad = long_ids.shape[1] - short_ids.shape[1]
    batch = torch.cat([long_ids, torch.cat([short_ids, torch.zeros(1, pad, dtype=torch.long)], 1)])
    mask = torch.ones_like(batch)
    mask[1, short_ids.shape[1]:] = 0
    rec = record_mlp_io(tiny_lm, batch, attention_mask=mask)
    one = record_mlp_io(tiny_lm, short_ids)
    n = short_ids.shape[1]
    torch.testing.assert_close(rec.outputs[:, 1, :n], one.outputs[:, 0], rtol=0, atol=ATOL)
    torch.testing.assert_close(rec.logits[1, :n], one.logits[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(rec.outputs[:, :1], record_mlp_io(tiny_lm, long_ids).outputs, rtol=0, atol=ATOL)


def test_record_rejects_1d_ids(tiny_lm):
    with pytest.raises(ValueError, match="batch, seq"):
        record_mlp_io(tiny_lm, tiny_lm.tokenize(PROMPT)[0])


def test_identity_replacement_is_bit_identical(lm):
    ids = lm.tokenize(PROMPT)
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        seen = []

        def identity(layer, mlp_input, mlp_output):
            seen.append((layer, mlp_input.shape, mlp_output.shape))
            return mlp_output.clone()

        with replace_mlp_outputs(lm, identity):
            after = lm.model(input_ids=ids).logits
    assert torch.equal(before, after)
    shape = (1, ids.shape[1], lm.d_model)
    assert seen == [(layer, shape, shape) for layer in range(lm.n_layers)]


def test_replacement_receives_the_layer_input(lm):
    ids = lm.tokenize(PROMPT)
    rec = record_mlp_io(lm, ids)
    got = {}

    def capture(layer, mlp_input, mlp_output):
        got[layer] = (mlp_input.detach().clone(), mlp_output.detach().clone())

    with torch.no_grad(), replace_mlp_outputs(lm, capture):
        lm.model(input_ids=ids)
    for layer in range(lm.n_layers):
        assert torch.equal(got[layer][0], rec.inputs[layer, 0:1])
        assert torch.equal(got[layer][1], rec.outputs[layer, 0:1])


def test_zeroing_one_layer_matches_hand_forward(lm):
    ids = lm.tokenize(PROMPT)
    layer = 1
    zeros = torch.zeros(1, ids.shape[1], lm.d_model)
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
        with replace_mlp_outputs(lm, lambda L, x, y: torch.zeros_like(y), layers=[layer]):
            ablated = lm.model(input_ids=ids).logits
        _, _, expected = hand_forward(lm, ids, replace={layer: zeros})
    assert not torch.allclose(clean, ablated, atol=1e-3)
    torch.testing.assert_close(ablated, expected, rtol=0, atol=ATOL)


def test_recording_inside_replacement_sees_replaced_outputs(tiny_lm):
    ids = tiny_lm.tokenize(PROMPT)
    with replace_mlp_outputs(tiny_lm, lambda L, x, y: torch.zeros_like(y), layers=[2]):
        rec = record_mlp_io(tiny_lm, ids)
    assert torch.count_nonzero(rec.outputs[2]) == 0
    assert torch.count_nonzero(rec.outputs[3]) > 0


def test_replacement_supports_gradients(tiny_lm):
    """Replacements are differentiable: a scale on layer 0's output gets a gradient through the model."""
    ids = tiny_lm.tokenize(PROMPT)
    scale = torch.tensor(1.0, requires_grad=True)
    with replace_mlp_outputs(tiny_lm, lambda L, x, y: y * scale, layers=[0]):
        logits = tiny_lm.model(input_ids=ids).logits
    logits[0, -1, 5].backward()
    assert scale.grad is not None and scale.grad != 0


def test_hooks_removed_after_use(lm):
    ids = lm.tokenize(PROMPT)
    lm.model(input_ids=ids)  # let transformers install its own (permanent) output-capturing hooks first
    baseline = hook_counts(lm.model)
    record_mlp_io(lm, ids)
    record_mlp_io(lm, ids, with_logits=False)
    with replace_mlp_outputs(lm, lambda L, x, y: y):
        assert hook_counts(lm.model) == baseline + 2 * lm.n_layers
        lm.model(input_ids=ids)
    assert hook_counts(lm.model) == baseline
    for layer in range(lm.n_layers):
        assert not lm.mlp_input_module(layer)._forward_hooks
        assert not lm.mlp_output_module(layer)._forward_hooks


def test_hooks_removed_when_fn_raises(lm):
    ids = lm.tokenize(PROMPT)
    baseline = hook_counts(lm.model)

    def boom(layer, mlp_input, mlp_output):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with replace_mlp_outputs(lm, boom):
            lm.model(input_ids=ids)
    assert hook_counts(lm.model) == baseline
    with pytest.raises(RuntimeError, match="boom"):
        with replace_mlp_outputs(lm, boom):
            record_mlp_io(lm, ids)
    assert hook_counts(lm.model) == baseline
    for layer in range(lm.n_layers):
        assert not lm.mlp_output_module(layer)._forward_hooks


def test_replacement_with_wrong_shape_is_a_clear_error(tiny_lm):
    ids = tiny_lm.tokenize(PROMPT)
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        with replace_mlp_outputs(tiny_lm, lambda L, x, y: y[..., :3]):
            tiny_lm.model(input_ids=ids)
    assert not tiny_lm.mlp_output_module(0)._forward_hooks
