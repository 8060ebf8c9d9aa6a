"""The real default model, Gemma 3 270M: loads offline, tokenizes right, predicts Paris, hooks are exact.

The first run converts the GGUF into the cache (about a minute); later runs load it in seconds.
Run only these with ``pytest -m real_model``; skip them with ``-m "not real_model"``.
"""

from __future__ import annotations

import pytest
import torch

from dictionaries.models.default_model import CHECK_IDS, CHECK_PROMPT
from dictionaries.models.hook_sites import record_mlp_io, replace_mlp_outputs

pytestmark = pytest.mark.real_model


def test_loads_the_default_model(real_lm):
    assert real_lm.name == "gemma-3-270m"
    assert real_lm.entry is not None and real_lm.entry.name == "gemma-3-270m"
    assert (real_lm.n_layers, real_lm.d_model) == (18, 640)
    assert type(real_lm.model).__name__ == "Gemma3ForCausalLM"
    assert real_lm.config._attn_implementation == "eager"


def test_tokenizer_ids(real_lm):
    assert real_lm.tokenize(CHECK_PROMPT)[0].tolist() == CHECK_IDS == [2, 818, 5279, 529, 7001, 563]


def test_chat_tokenization(real_lm):
    ids = real_lm.tokenize("Hi", chat=True)[0].tolist()
    text = real_lm.tokenizer.decode(ids)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_paris_in_top5(real_lm):
    ids = real_lm.tokenize(CHECK_PROMPT)
    with torch.no_grad():
        logits = real_lm.model(input_ids=ids).logits[0, -1]
    top5 = [real_lm.tokenizer.decode([i]) for i in logits.topk(5).indices.tolist()]
    assert " Paris" in top5, top5


def test_recording_equals_model_computation(real_lm):
    ids = real_lm.tokenize(CHECK_PROMPT)
    rec = record_mlp_io(real_lm, ids)
    assert rec.outputs.shape == (18, 1, ids.shape[1], 640)
    with torch.no_grad():
        for layer_index, layer in enumerate(real_lm.layers):
            own = layer.post_feedforward_layernorm(layer.mlp(rec.inputs[layer_index]))
            torch.testing.assert_close(rec.outputs[layer_index], own, rtol=1e-5, atol=1e-4)
        assert torch.equal(rec.logits, real_lm.model(input_ids=ids).logits)
    short = record_mlp_io(real_lm, ids, with_logits=False)
    assert short.logits is None and torch.equal(short.outputs, rec.outputs)


def test_identity_replacement_is_bit_identical(real_lm):
    ids = real_lm.tokenize(CHECK_PROMPT)
    with torch.no_grad():
        before = real_lm.model(input_ids=ids).logits
        with replace_mlp_outputs(real_lm, lambda layer, x, y: y.clone()):
            after = real_lm.model(input_ids=ids).logits
    assert torch.equal(before, after)
