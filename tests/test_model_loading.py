"""Loading models (short names, directories, hub ids), LoadedModel, tokenization and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT, make_tiny_checkpoint, make_tiny_tokenizer

from dictionaries.errors import CircuitscopeError, ModelLoadError
from dictionaries.models import default_model
from dictionaries.models import loading as model_loading
from dictionaries.models.loading import LoadedModel, load_model
from dictionaries.models.registry import GEMMA3, known_names, lookup, match_config

# ---------------------------------------------------------------- registry


def test_registry_lookups():
    entry = lookup("gemma-3-270m")
    assert entry.name == "gemma-3-270m" and entry.variant == "pt"
    assert (entry.size.n_layers, entry.size.d_model) == (18, 640)
    assert entry.hub_id == "google/gemma-3-270m"
    it4 = lookup("google/gemma-3-4b-it")
    assert it4.name == "gemma-3-4b-it" and it4.size.multimodal and it4.size.n_layers == 34
    assert match_config(18, 640).size == "270m"
    assert match_config(4, 32) is None
    assert lookup("gpt2") is None


# ---------------------------------------------------------------- loading a directory


def test_load_directory(tiny_lm, tiny_checkpoint_dir):
    lm = tiny_lm
    assert isinstance(lm, LoadedModel)
    assert type(lm.model).__name__ == "Gemma3ForCausalLM"
    assert lm.text_model is lm.model.model
    assert lm.lm_head is lm.model.lm_head
    assert lm.name == str(tiny_checkpoint_dir)
    assert lm.entry is None  # 4 x 32 is no family size
    assert lm.family is GEMMA3
    assert (lm.n_layers, lm.d_model) == (4, 32)
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert lm.layers is lm.text_model.layers
    assert lm.config.model_type == "gemma3_text"
    assert lm.config._attn_implementation == "eager"  # the CPU default
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.mlp_input_module(2) is lm.layers[2].pre_feedforward_layernorm
    assert lm.mlp_output_module(3) is lm.layers[3].post_feedforward_layernorm


def test_load_multimodal_directory(tiny_mm_lm):
    lm = tiny_mm_lm
    assert type(lm.model).__name__ == "Gemma3ForConditionalGeneration"
    assert lm.text_model is lm.model.model.language_model
    assert lm.lm_head is lm.model.lm_head
    assert lm.config.model_type == "gemma3_text"  # the text config, not the image-text one
    assert (lm.n_layers, lm.d_model) == (4, 32)
    assert lm.mlp_output_module(1) is lm.model.model.language_model.layers[1].post_feedforward_layernorm
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_load_options(tiny_checkpoint_dir):
    lm = load_model(str(tiny_checkpoint_dir), dtype="bfloat16", device="cpu", attn_implementation="sdpa")
    assert lm.dtype == torch.bfloat16
    assert lm.config._attn_implementation == "sdpa"
    logits = lm.model(input_ids=lm.tokenize(PROMPT)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_entry_matched_by_config(tmp_path):
    """A directory whose shape is a family size gets that entry; ``-it`` in its name picks the variant."""
    shape = dict(num_hidden_layers=18, hidden_size=640, intermediate_size=8, num_attention_heads=1,
                 num_key_value_heads=1, head_dim=8)
    pt = load_model(make_tiny_checkpoint(tmp_path / "my-gemma", **shape))
    assert pt.entry is not None and pt.entry.name == "gemma-3-270m"
    assert pt.entry.gemma_scope_repo == "google/gemma-scope-2-270m-pt"
    it = load_model(make_tiny_checkpoint(tmp_path / "gemma-3-270m-it-local", **shape))
    assert it.entry.name == "gemma-3-270m-it"


def test_local_directory_wins_over_a_registry_name(monkeypatch, tmp_path):
    """``hf download google/gemma-3-1b-it --local-dir gemma-3-1b-it`` then ``load_model("gemma-3-1b-it")``."""
    make_tiny_checkpoint(tmp_path / "gemma-3-1b-it")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("gemma-3-1b-it")
    assert lm.name == "gemma-3-1b-it" and lm.n_layers == 4


def test_default_name_uses_the_cached_checkpoint(monkeypatch, tiny_checkpoint_dir):
    """``gemma-3-270m`` resolves to the default-model cache (patched here to the tiny checkpoint)."""
    monkeypatch.setattr(model_loading, "ensure_default_checkpoint", lambda: tiny_checkpoint_dir)
    lm = load_model()
    assert lm.name == "gemma-3-270m"
    assert lm.entry == lookup("gemma-3-270m")


# ---------------------------------------------------------------- errors


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelLoadError) as info:
        load_model("gemma-9-7b")
    message = str(info.value)
    assert "gemma-9-7b" in message
    for name in known_names():
        assert name in message


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model") as info:
        load_model(str(missing))
    assert "gemma-3-270m" in str(info.value)


def test_file_or_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_directory_without_tokenizer(tmp_path):
    from conftest import make_tiny_model

    make_tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(tmp_path)


def test_not_a_gemma3_model(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'llama'.*gemma3_text"):
        load_model(tmp_path)


def test_truncated_weights(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "broken")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="broken"):
        load_model(directory)


@pytest.mark.parametrize(
    "name", ["google/gemma-3-1b-pt", "gemma-3-1b-it", "someone/gemma-3-custom", "google/gemma-3-270m"]
)
def test_unreachable_hub(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An explicit hub id means the hub's weights, never the bundled default model.
    monkeypatch.setattr(model_loading, "ensure_default_checkpoint", lambda: pytest.fail("used the GGUF"))
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    message = str(info.value)
    hub_id = lookup(name).hub_id if lookup(name) else name
    assert hub_id in message
    assert "could not be reached" in message
    assert "directory" in message and "gemma-3-270m" in message


def test_device_and_device_map_conflict(tiny_checkpoint_dir):
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(tiny_checkpoint_dir, device="cpu", device_map="cpu")


def test_layer_out_of_range(tiny_lm):
    with pytest.raises(CircuitscopeError, match="0..3"):
        tiny_lm.mlp_output_module(4)


# ---------------------------------------------------------------- tokenization


def test_tokenize_adds_bos(tiny_lm):
    ids = tiny_lm.tokenize(PROMPT)
    assert ids.dtype == torch.long and ids.shape == (1, len(PROMPT.split()) + 1)
    assert ids[0, 0].item() == 2


def test_tokenize_chat(tiny_lm):
    ids = tiny_lm.tokenize("hello world", chat=True)[0].tolist()
    tok = tiny_lm.tokenizer
    start, end, user, model = tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>", "user", "model"])
    hello, world = tok.convert_tokens_to_ids(["hello", "world"])
    assert ids == [2, start, user, hello, world, end, start, model]


def test_tokenize_chat_without_template_uses_gemma_format(tiny_checkpoint_dir):
    lm = load_model(tiny_checkpoint_dir)
    expected = lm.tokenize("hello world", chat=True)
    lm.tokenizer.chat_template = None
    assert torch.equal(lm.tokenize("hello world", chat=True), expected)


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt(tiny_lm, prompt):
    with pytest.raises(CircuitscopeError, match="empty"):
        tiny_lm.tokenize(prompt)


def test_too_long_prompt(tiny_lm):
    prompt = " ".join(["cat"] * 100)
    with pytest.raises(CircuitscopeError, match=r"101 tokens.*at most 64"):
        tiny_lm.tokenize(prompt)


# ---------------------------------------------------------------- default-model cache (no real model)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUITSCOPE_CACHE", str(tmp_path))
    assert default_model.default_checkpoint_dir() == tmp_path / "models" / "gemma-3-270m"
    monkeypatch.delenv("CIRCUITSCOPE_CACHE")
    assert str(default_model.cache_dir()).endswith(".cache/circuitscope")


def test_existing_checkpoint_is_not_reconverted(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUITSCOPE_CACHE", str(tmp_path))
    target = default_model.default_checkpoint_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(default_model, "_convert_into", lambda t: pytest.fail("converted again"))
    assert default_model.ensure_default_checkpoint() == target


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUITSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_assemble_gguf", lambda d: d / "fake.gguf")

    def half_then_fail(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_gguf_to_checkpoint", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        default_model.ensure_default_checkpoint()
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_conversion_checks_the_tokenizer(monkeypatch, tmp_path):
    """A checkpoint whose tokenizer is wrong (here: the tiny one) is refused and not cached."""
    monkeypatch.setenv("CIRCUITSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_assemble_gguf", lambda d: d / "fake.gguf")
    monkeypatch.setattr(default_model, "_gguf_to_checkpoint", lambda g, out: make_tiny_checkpoint(out))
    with pytest.raises(ModelLoadError, match=r"transformers>=5.23"):
        default_model.ensure_default_checkpoint()
    assert not default_model.default_checkpoint_dir().exists()


def test_conversion_moves_checkpoint_into_place(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUITSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_assemble_gguf", lambda d: d / "fake.gguf")
    monkeypatch.setattr(default_model, "_gguf_to_checkpoint", lambda g, out: make_tiny_checkpoint(out))
    monkeypatch.setattr(default_model, "_check_saved_tokenizer", lambda d: None)
    target = default_model.ensure_default_checkpoint()
    assert target == default_model.default_checkpoint_dir() and default_model.is_checkpoint_dir(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".gemma-3-270m.lock", "gemma-3-270m"]
    assert load_model(target).n_layers == 4


def test_check_tokenizer_rejects_wrong_ids():
    with pytest.raises(ModelLoadError, match="expected \\[2, 818, 5279, 529, 7001, 563\\]"):
        default_model.check_tokenizer(make_tiny_tokenizer())
