"""Tiny random Gemma 3 models for fast CPU tests, built in memory and loaded through ``load_model``.

The text model has 4 layers (sliding, full, sliding, full; window 4, shorter than the test prompts),
d_model 32, GQA (4 query heads, 2 kv heads, head_dim 8), q/k norms and random (not unit) norm scales.
The multimodal model wraps the same kind of text stack in ``Gemma3ForConditionalGeneration`` with a
one-layer SigLIP tower, like the 4B+ checkpoints.

``sized_overrides(size, **shrink)`` gives the overrides for a random model with a registry size's structure
(layer count, heads, widths, attention pattern; vocabulary shrunk to the tiny tokenizer's).

Fixtures: ``tiny_lm`` / ``tiny_mm_lm`` (session-scoped LoadedModels), ``tiny_checkpoint_dir``, and
``make_tiny_lm`` (a factory: ``make_tiny_lm(multimodal=False, seed=0, name=None, **text_config_overrides)``).
The module-level helpers below can also be imported (``from conftest import make_tiny_checkpoint``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# training_helpers' fixtures (text_file, single_thread), for every test module without importing them
pytest_plugins = ["training_helpers"]

WORDS = (
    "the capital of france is paris a an and in on to it that this was for with as by at from be are "
    "one two three four five six seven eight nine ten red green blue cat dog bird tree house river city "
    "user model hello world what who where when why how answer question"
).split()
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
TINY_VOCAB = 300
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PROMPT = "the capital of france is paris and the cat was in the tree"  # 12 words + BOS: > sliding window


def tiny_text_config(**overrides):
    from transformers import Gemma3TextConfig

    settings = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=4,
        query_pre_attn_scalar=8,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    settings.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        pattern = ["sliding_attention", "full_attention"]
        settings["layer_types"] = [pattern[i % 2] for i in range(settings["num_hidden_layers"])]
    return Gemma3TextConfig(**settings)


def sized_overrides(size, **shrink) -> dict:
    """``make_tiny_model`` overrides for a random model with the structure of registry size ``size`` (a
    ``ModelSize``): its published config values with the tiny tokenizer's vocabulary, then ``shrink`` (e.g.
    ``hidden_size=64``); ``layer_types`` follows ``num_hidden_layers`` with the size's own attention pattern.
    Pass ``multimodal=size.multimodal`` to ``make_tiny_model`` for the size's transformers class."""
    values = {**size.text_config_values(), "vocab_size": TINY_VOCAB, **shrink}
    if "layer_types" not in shrink:
        values["layer_types"] = size.layer_types(values["num_hidden_layers"])
    return values


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights everywhere, norms included (Gemma norms scale by 1 + weight)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = 0.3 if "norm" in name else 0.2
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_tiny_tokenizer():
    """A WordLevel tokenizer: <pad> 0, <eos> 1, <bos> 2, BOS added, a minimal Gemma-style chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    for i in range(len(vocab), TINY_VOCAB):
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(multimodal: bool = False, seed: int = 0, **overrides):
    """A random tiny ``Gemma3ForCausalLM`` or (multimodal) ``Gemma3ForConditionalGeneration``, eager attention."""
    from transformers import (
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ForConditionalGeneration,
        SiglipVisionConfig,
    )
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    text_config = tiny_text_config(**overrides)
    # _randomise overwrites every parameter: skip transformers' own initialisation (most of a 1B-shaped model's
    # build time); buffers (rotary frequencies, the embedding scale) are made in __init__ either way.
    with no_init_weights():
        if multimodal:
            vision = SiglipVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=28, patch_size=14,
            )
            config = Gemma3Config(text_config=text_config, vision_config=vision, mm_tokens_per_image=4)
            config._attn_implementation = "eager"
            model = Gemma3ForConditionalGeneration(config)
        else:
            text_config._attn_implementation = "eager"
            model = Gemma3ForCausalLM(text_config)
    _randomise(model, seed)
    if model.config.get_text_config().tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def make_tiny_checkpoint(directory: Path, multimodal: bool = False, seed: int = 0, **overrides) -> Path:
    """Save a tiny model and its tokenizer as a Hugging Face checkpoint directory; returns it."""
    directory = Path(directory)
    make_tiny_model(multimodal, seed, **overrides).save_pretrained(directory)
    make_tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def verified_files_record(tmp_path_factory) -> Iterator[Path]:
    """Loads record the files they scanned for NaN/inf in this session's record, never in the user's cache."""
    path = tmp_path_factory.mktemp("verified") / "verified_files.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIRCUITSCOPE_VERIFIED_FILES", str(path))
        yield path


@pytest.fixture(scope="session")
def make_tiny_lm(tmp_path_factory):
    """Factory fixture: ``make_tiny_lm(multimodal=False, seed=0, name=None, **overrides) -> LoadedModel``."""
    from dictionaries.models.loading import load_model

    def make(multimodal: bool = False, seed: int = 0, name: str | None = None, **overrides):
        directory = tmp_path_factory.mktemp(name or ("tiny-mm" if multimodal else "tiny"))
        return load_model(make_tiny_checkpoint(directory, multimodal, seed, **overrides))

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_checkpoint_dir):
    """The tiny text model (4 layers, d_model 32) as a LoadedModel; do not modify it in tests."""
    from dictionaries.models.loading import load_model

    return load_model(tiny_checkpoint_dir)


@pytest.fixture(scope="session")
def tiny_mm_lm(make_tiny_lm):
    """A tiny ``Gemma3ForConditionalGeneration`` (text stack under ``model.language_model``) as a LoadedModel."""
    return make_tiny_lm(multimodal=True, seed=1)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` torch threads, restoring the previous setting. Tiny models run several times faster
    on one thread, and do not spin-wait when other processes share the 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """Use with ``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def real_lm():
    """The real Gemma 3 270M (default model), loaded once per session, offline; for tests marked real_model."""
    from dictionaries.models.loading import load_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # the default model must never need the hub
        return load_model()
