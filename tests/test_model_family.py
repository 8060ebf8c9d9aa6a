"""The engine follows the family description, not Gemma 3's module names.

Two tiny random models of families the package does not ship, each wrapped with a family description written
here:

- Llama-style: different module names (the MLP reads ``post_attention_layernorm``'s output, the MLP output site
  is ``mlp`` itself, not a norm), no attention output norm, norms that scale by ``w`` rather than ``1 + w`` with
  their eps under another attribute name, no q/k norms, an unscaled embedding;
- Gemma 2: Gemma's module names but no q/k norms, attention logit softcapping and a final logit softcap (30).

For both, every edge of every kind equals a perturbation of the frozen replacement model, the frozen model with
all sources is the real network, and (Gemma 2) the logit targets' probabilities are the model's own, softcap
included. A description with the wrong norm gain or embedding scale is caught.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT, TINY_VOCAB, make_tiny_tokenizer
from test_attribution_edges import EDGE_KINDS, Frozen, check_columns, dense_rows, make_dictionaries

from circuits.engine.attribution import attribute
from circuits.interventions.frozen_model import run_frozen
from circuits.settings import TraceSettings
from dictionaries.errors import ModelLoadError
from dictionaries.models.architecture import Architecture, NormStyle
from dictionaries.models.loading import wrap_model
from dictionaries.models.registry import GEMMA3, ModelFamily

LLAMA_LIKE = ModelFamily(
    name="llama-like (test)",
    sizes=(),
    architecture=Architecture(
        attention_output_norm=None,
        mlp_input="post_attention_layernorm",
        mlp_output="mlp",
        query_norm=None,
        key_norm=None,
        norm=NormStyle(gain_offset=0.0, eps_attribute="variance_epsilon"),
        embedding_scale="none",
        logit_softcap_attribute=None,
    ),
    model_classes={"llama": "LlamaForCausalLM"},
    text_stack_paths=("model",),
)
GEMMA2 = ModelFamily(
    name="gemma-2 (test)",
    sizes=(),
    architecture=Architecture(query_norm=None, key_norm=None),
    model_classes={"gemma2": "Gemma2ForCausalLM"},
    text_stack_paths=("model",),
)
SHAPE = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
             bos_token_id=2)


def _random(model: torch.nn.Module, seed: int, norm_mean: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(norm_mean + 0.3 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def llama_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return _random(LlamaForCausalLM(config), 3, norm_mean=1.0)  # Llama norms scale by w: keep them near 1


def gemma2_model():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**SHAPE, sliding_window=4, query_pre_attn_scalar=8, attn_logit_softcapping=5.0,
                          final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"] * 1
                          + ["sliding_attention"])
    config._attn_implementation = "eager"
    return _random(Gemma2ForCausalLM(config), 4, norm_mean=0.0)


@pytest.fixture(scope="module")
def family_models():
    return {
        "llama-like": wrap_model(llama_model(), make_tiny_tokenizer(), LLAMA_LIKE, "tiny-llama"),
        "gemma-2": wrap_model(gemma2_model(), make_tiny_tokenizer(), GEMMA2, "tiny-gemma2"),
    }


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.mark.parametrize("family", ["llama-like", "gemma-2"])
@pytest.mark.parametrize("kind", [("per-layer", True), ("cross-layer", False)], ids=["skip-transcoder", "clt"])
def test_every_edge_of_another_family_equals_a_perturbation(family_models, family, kind):
    lm = family_models[family]
    dicts = make_dictionaries(lm, *kind, seed=5, width=8, active_fraction=0.25)
    att = attribute(lm, dicts, PROMPT, TraceSettings(batch_size=7))
    A, computed = dense_rows(att)
    assert computed.all()
    frozen = Frozen(lm, dicts, att)
    counts = check_columns(frozen, A, torch.arange(A.shape[0]), list(range(att.layout.n_sources)))
    for edge_kind in EDGE_KINDS:
        assert counts.get(edge_kind, 0) > 0, counts

    # the frozen replacement model with every source is the real network
    out = run_frozen(lm, att.clean, att.replacement, dicts)
    with torch.no_grad():
        logits = lm.model(input_ids=att.input_ids[None], use_cache=False).logits[0].float()
    torch.testing.assert_close(out.final_hidden, att.clean.final_hidden.float(), rtol=1e-5, atol=1e-5)
    cap = lm.architecture.softcapped(lm.config, lm.lm_head(out.final_hidden).float())
    torch.testing.assert_close(cap, logits, rtol=1e-5, atol=1e-4)
    # logit targets' probabilities are the model's own (after the softcap, where the family has one)
    probs = torch.softmax(logits[att.position], -1)
    torch.testing.assert_close(torch.tensor(att.logits.probabilities), probs[att.logits.token_ids], rtol=1e-5,
                               atol=1e-7)


def test_the_softcap_is_applied_where_the_family_has_one(family_models):
    gemma2, llama = family_models["gemma-2"], family_models["llama-like"]
    assert gemma2.architecture.logit_softcap(gemma2.config) == 3.0
    assert llama.architecture.logit_softcap(llama.config) is None
    x = torch.tensor([-10.0, 0.5, 10.0])
    torch.testing.assert_close(gemma2.architecture.softcapped(gemma2.config, x), 3.0 * torch.tanh(x / 3.0))
    assert torch.equal(llama.architecture.softcapped(llama.config, x), x)


def test_a_wrong_norm_gain_breaks_the_frozen_model(family_models):
    """The engine reads the gain offset: with Gemma's 1 + w on a Llama-style model, the frozen model with every
    source no longer reproduces the network (so the correct result above is not an accident)."""
    right = family_models["llama-like"]
    wrong_arch = Architecture(**{**LLAMA_LIKE.architecture.__dict__, "norm": NormStyle(1.0, "variance_epsilon")})
    wrong = wrap_model(right.model, right.tokenizer, ModelFamily(**{**LLAMA_LIKE.__dict__, "architecture": wrong_arch}),
                       "tiny-llama-wrong")
    dicts = make_dictionaries(right, "per-layer", True, seed=5, width=8)
    att = attribute(wrong, dicts, PROMPT)
    out = run_frozen(wrong, att.clean, att.replacement, dicts)
    with torch.no_grad():
        hidden = right.text_model(input_ids=att.input_ids[None], use_cache=False).last_hidden_state[0].float()
    assert (out.final_hidden - hidden).abs().max() > 1e-2


def test_family_descriptions_that_do_not_match_the_model_are_refused(family_models):
    llama = family_models["llama-like"]
    with pytest.raises(ModelLoadError, match="embedding module scales by"):  # Gemma says sqrt(d); Llama's is plain
        wrap_model(llama.model, llama.tokenizer,
                   ModelFamily(**{**LLAMA_LIKE.__dict__, "architecture": GEMMA3.architecture}), "tiny-llama-as-gemma")
