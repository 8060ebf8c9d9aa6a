"""Every size of the Gemma 3 family traces with the same code (issue 13, "Bigger models").

- The registry's size table is the published one: a model built from each size's config values has the
  published parameter count (keras-hub's Gemma 3 presets, text-only, vocabulary 262,144, tied embeddings).
- Every size's *structure* (its layer count, head layout, attention pattern and transformers class: the
  multimodal wrapper for 4B-27B) at a reduced width: the hook sites, norms and attention modules resolve, the
  frozen replacement model with every source is the real network, and sampled edges equal perturbations.
- The 1B shape itself (26 layers, d_model 1152, 4 heads of 256, 1 kv head, d_mlp 6912; only the vocabulary
  shrunk to the tiny tokenizer's 300): matched to its registry size, traced, edges checked.
- A 4B-structured multimodal checkpoint (Gemma3ForConditionalGeneration with the real 34 layers, 8 heads and
  4 kv heads, at d_model 256 instead of 2560, and a one-layer vision tower) saved with ``save_pretrained`` and
  loaded by ``load_model``: its text stack is traced on a text-only prompt and its edges checked.

Random weights throughout (tests/conftest.py's ``make_tiny_model``); nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_checkpoint, make_tiny_model, make_tiny_tokenizer, sized_overrides
from test_attribution_edges import EDGE_KINDS, Frozen, check_columns, dense_rows, make_dictionaries, sample_sources

from circuits.engine.attribution import attribute
from circuits.interventions.frozen_model import run_frozen
from circuits.settings import TraceSettings
from dictionaries.models.architecture import submodule
from dictionaries.models.loading import load_model, wrap_model
from dictionaries.models.registry import GEMMA3, lookup, match_config

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# keras-hub's gemma3 presets ("params" of gemma3_270m, gemma3_1b, gemma3_{4b,12b,27b}_text).
PUBLISHED_PARAMETERS = {"270m": 268_098_176, "1b": 999_885_952, "4b": 3_880_099_328, "12b": 11_765_788_416,
                        "27b": 27_009_002_240}
SIZES = [size.size for size in GEMMA3.sizes]
SHORT_PROMPT = "the capital of france is"


@pytest.mark.parametrize("name", SIZES)
def test_size_table_gives_the_published_parameter_count(name):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    size = GEMMA3.size(name)
    config = Gemma3TextConfig(**{**size.text_config_values(), "vocab_size": 262_144})
    with torch.device("meta"):  # shapes only: no memory
        model = Gemma3ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    assert config.layer_types == size.layer_types()
    full = [layer for layer, kind in enumerate(size.layer_types()) if kind == "full_attention"]
    assert full == list(range(5, size.n_layers, 6))  # five local layers, then a global one


def test_sizes_are_found_by_name_and_by_shape():
    for size in GEMMA3.sizes:
        assert match_config(size.n_layers, size.d_model) is size
        assert match_config(size.n_layers, size.d_model, GEMMA3) is size
        assert lookup(f"google/gemma-3-{size.size}-it").size is size
    assert [s.size for s in GEMMA3.sizes if s.multimodal] == ["4b", "12b", "27b"]
    assert (GEMMA3.size("4b").vocab_size, GEMMA3.size("1b").vocab_size) == (262_208, 262_144)
    assert match_config(26, 2560) is None
    with pytest.raises(KeyError, match="270m, 1b, 4b, 12b, 27b"):
        GEMMA3.size("2b")


def _check_layout(lm, size, head_dim: int) -> None:
    """The family's hook sites, norms and attention modules resolve on every layer, with the size's head layout."""
    arch = lm.architecture
    expected_class = "Gemma3ForConditionalGeneration" if size.multimodal else "Gemma3ForCausalLM"
    assert type(lm.model).__name__ == expected_class
    assert lm.text_model is (lm.model.model.language_model if size.multimodal else lm.model.model)
    assert lm.config.model_type == "gemma3_text"
    assert lm.n_layers == len(lm.layers) == size.n_layers
    assert arch.heads(lm.config) == (size.n_heads, size.n_kv_heads, head_dim)
    assert lm.config.layer_types == size.layer_types() and lm.config.sliding_window == size.sliding_window
    for layer, module in enumerate(lm.layers):
        assert lm.mlp_input_module(layer) is module.pre_feedforward_layernorm
        assert lm.mlp_output_module(layer) is module.post_feedforward_layernorm
        assert lm.layer_module(layer, arch.attention_norm) is module.input_layernorm
        assert lm.layer_module(layer, arch.attention_output_norm) is module.post_attention_layernorm
        attention = lm.attention_module(layer)
        assert attention is module.self_attn
        assert submodule(attention, arch.query_projection).out_features == size.n_heads * head_dim
        assert submodule(attention, arch.key_projection).out_features == size.n_kv_heads * head_dim
        assert submodule(attention, arch.value_projection).out_features == size.n_kv_heads * head_dim
        assert submodule(attention, arch.output_projection).in_features == size.n_heads * head_dim
        assert submodule(attention, arch.query_norm) is not None and submodule(attention, arch.key_norm) is not None
    assert lm.final_norm is lm.text_model.norm and lm.embedding is lm.text_model.embed_tokens


def _check_trace(lm, dicts, att, layers, n_errors=3) -> None:
    """The frozen model with every source is the real network (logits of the loaded top-level model, so a
    wrapper's text-only forward), the targets' probabilities are the model's, and sampled edges of every kind
    (features from ``layers``) equal perturbations."""
    A, computed = dense_rows(att)
    assert computed.all()
    assert set(att.replacement.features.layer.tolist()) == set(range(lm.n_layers))
    out = run_frozen(lm, att.clean, att.replacement, dicts)
    with torch.no_grad():
        logits = lm.model(input_ids=att.input_ids[None], use_cache=False).logits[0].float()
    torch.testing.assert_close(lm.lm_head(out.final_hidden).float(), logits, rtol=1e-4, atol=1e-4)
    probs = torch.softmax(logits[att.position], -1)[att.logits.token_ids]
    torch.testing.assert_close(torch.tensor(att.logits.probabilities), probs, rtol=1e-4, atol=1e-6)
    sources = sample_sources(att, n_features=2, n_errors=n_errors, seed=1, n_tokens=1, layers=layers)
    counts = check_columns(Frozen(lm, dicts, att), A, torch.arange(A.shape[0]), sources)
    for edge_kind in EDGE_KINDS:
        assert counts.get(edge_kind, 0) > 0, f"no {edge_kind} edge was checked: {counts}"


@pytest.mark.parametrize("name", SIZES)
def test_every_size_structure_traces(name):
    """Real depth, head counts, attention pattern and class; d_model 64, head_dim 16, d_mlp 4 x d_model."""
    size = GEMMA3.size(name)
    shape = sized_overrides(size, hidden_size=64, intermediate_size=256, head_dim=16, query_pre_attn_scalar=16)
    lm = wrap_model(make_tiny_model(size.multimodal, seed=2, **shape), make_tiny_tokenizer(), GEMMA3, f"{name}-like")
    assert lm.entry is None  # d_model 64 is no family size
    _check_layout(lm, size, head_dim=16)
    dicts = make_dictionaries(lm, "per-layer", skip=True, seed=3, width=4, active_fraction=0.3)
    att = attribute(lm, dicts, SHORT_PROMPT, TraceSettings(batch_size=64))
    _check_trace(lm, dicts, att, layers=(0, size.n_layers // 2, size.n_layers - 1), n_errors=4)


@pytest.fixture(scope="module")
def one_b():
    """A random model with the 1B's real shape (vocabulary 300), wrapped in memory (~3 GB in float32)."""
    model = make_tiny_model(False, seed=4, **sized_overrides(GEMMA3.size("1b")))
    return wrap_model(model, make_tiny_tokenizer(), GEMMA3, "gemma-3-1b-random")


def test_1b_shape_traces_with_exact_edges(one_b):
    lm = one_b
    size = GEMMA3.size("1b")
    assert lm.entry is not None and lm.entry.size is size and lm.entry.name == "gemma-3-1b"
    assert (lm.n_layers, lm.d_model, lm.layers[0].mlp.down_proj.in_features) == (26, 1152, 6912)
    _check_layout(lm, size, head_dim=256)
    dicts = make_dictionaries(lm, "per-layer", skip=True, seed=5, width=8, active_fraction=0.25)
    att = attribute(lm, dicts, SHORT_PROMPT, TraceSettings(batch_size=64))
    _check_trace(lm, dicts, att, layers=(0, 13, 25))


def test_multimodal_checkpoint_traces_its_text_stack(tmp_path):
    """Gemma3ForConditionalGeneration saved with save_pretrained and loaded from its directory: 4B's 34 layers,
    8 heads and 4 kv heads at d_model 256 (head_dim 32, d_mlp 1024); a cross-layer transcoder with skip."""
    size = GEMMA3.size("4b")
    shape = sized_overrides(size, hidden_size=256, intermediate_size=1024, head_dim=32, query_pre_attn_scalar=32)
    directory = make_tiny_checkpoint(tmp_path / "gemma-3-4b-like", multimodal=True, seed=6, **shape)
    lm = load_model(directory)
    assert lm.model.config.model_type == "gemma3" and lm.entry is None
    _check_layout(lm, size, head_dim=32)
    dicts = make_dictionaries(lm, "cross-layer", skip=True, seed=7, width=8, active_fraction=0.25)
    att = attribute(lm, dicts, SHORT_PROMPT, TraceSettings(batch_size=64))
    _check_trace(lm, dicts, att, layers=(0, 17, 33))
