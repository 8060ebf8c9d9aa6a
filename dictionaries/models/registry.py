"""Model families: sizes, layer counts, widths, hub ids, Gemma Scope 2 repositories, the transformers classes
that load them and their architecture description (module names, hook sites, norm style; see
:mod:`dictionaries.models.architecture`).

Code that needs to know anything about a model size or family looks it up here; nothing else matches on
repository names. A model loaded from a directory or hub id is matched to its family by ``config.model_type``
and to its size by its config (layer count and d_model), never by its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .architecture import Architecture

Variant = Literal["pt", "it"]

# Gemma 3's turn format (what the official chat template renders for user/model turns without images).
# The GGUF of the base model carries no chat template, so the conversion adds this one; tokenizers of
# the family that lack a template fall back to it as well.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ModelSize:
    """One size of the family: its published shape, as the checkpoint's Hugging Face ``config.json`` gives it
    (the ``text_config`` of the multimodal sizes). ``multimodal`` sizes load as image-text models whose text
    stack sits under ``model.language_model``; the others load as causal LMs with the stack under ``model``.

    Layer ``L`` is a global (full-attention) layer when ``(L + 1) % global_every == 0`` and a local one,
    attending to the last ``sliding_window`` tokens, otherwise (Gemma 3: five local layers, then one global)."""

    size: str
    n_layers: int  # num_hidden_layers
    d_model: int  # hidden_size
    d_mlp: int  # intermediate_size
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    head_dim: int
    sliding_window: int
    vocab_size: int
    multimodal: bool
    hub_ids: dict[str, str]
    query_pre_attn_scalar: float = 256  # attention logits are scaled by its inverse square root
    global_every: int = 6  # transformers' sliding_window_pattern
    # Dictionary sets shipped inside the package for this size, by variant: a folder name under
    # dictionaries/bundled_sets/ (see dictionaries/bundled.py). Sizes without one need --dictionaries.
    bundled_dictionaries: dict[str, str] = field(default_factory=dict)

    def hub_id(self, variant: Variant) -> str:
        return self.hub_ids[variant]

    def gemma_scope_repo(self, variant: Variant) -> str:
        return f"google/gemma-scope-2-{self.size}-{variant}"

    def name(self, variant: Variant) -> str:
        """Canonical short name, e.g. ``gemma-3-270m`` (pt) or ``gemma-3-1b-it``."""
        return f"gemma-3-{self.size}" + ("" if variant == "pt" else f"-{variant}")

    def layer_types(self, n_layers: int | None = None) -> list[str]:
        """transformers' ``layer_types`` for this size's attention pattern over ``n_layers`` (default: its own)."""
        count = self.n_layers if n_layers is None else n_layers
        return ["full_attention" if (layer + 1) % self.global_every == 0 else "sliding_attention"
                for layer in range(count)]

    def text_config_values(self) -> dict:
        """The ``Gemma3TextConfig`` keyword arguments of this size's shape (what tests and benchmarks build
        random models of this size from; rope settings, which do not change the shape, are left at their
        defaults)."""
        return dict(num_hidden_layers=self.n_layers, hidden_size=self.d_model, intermediate_size=self.d_mlp,
                    num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim,
                    sliding_window=self.sliding_window, layer_types=self.layer_types(), vocab_size=self.vocab_size,
                    query_pre_attn_scalar=self.query_pre_attn_scalar)


@dataclass(frozen=True)
class ModelFamily:
    """One family: its sizes, how its modules are laid out (``architecture``; the hook sites are its
    ``mlp_input`` and ``mlp_output``), the transformers class for each ``config.model_type`` it covers, and
    the attribute paths from a loaded top-level model to its text decoder stack, tried in order."""

    name: str
    sizes: tuple[ModelSize, ...]
    architecture: Architecture
    model_classes: dict[str, str]
    text_stack_paths: tuple[str, ...]
    # The chat format used for ``--chat`` when a checkpoint's tokenizer carries no template.
    chat_template: str | None = None

    def size(self, name: str) -> ModelSize:
        """The size called ``name`` (``"1b"``)."""
        for size in self.sizes:
            if size.size == name:
                return size
        raise KeyError(f"{self.name} has no size {name!r}; it has " + ", ".join(s.size for s in self.sizes))


GEMMA3 = ModelFamily(
    name="gemma-3",
    # The published configs (google/gemma-3-*-pt config.json; the text_config of 4B-27B). The multimodal sizes'
    # text vocabulary is 262,208 (the 262,144 of 270M/1B plus image tokens): their configs leave vocab_size at
    # Gemma3TextConfig's default. 27B's attention scale is d_model / n_heads = 168, not head_dim.
    sizes=(
        ModelSize("270m", n_layers=18, d_model=640, d_mlp=2048, n_heads=4, n_kv_heads=1, head_dim=256,
                  sliding_window=512, vocab_size=262144, multimodal=False,
                  hub_ids={"pt": "google/gemma-3-270m", "it": "google/gemma-3-270m-it"},
                  bundled_dictionaries={"pt": "gemma-3-270m-skip-transcoders"}),
        ModelSize("1b", n_layers=26, d_model=1152, d_mlp=6912, n_heads=4, n_kv_heads=1, head_dim=256,
                  sliding_window=512, vocab_size=262144, multimodal=False,
                  hub_ids={"pt": "google/gemma-3-1b-pt", "it": "google/gemma-3-1b-it"}),
        ModelSize("4b", n_layers=34, d_model=2560, d_mlp=10240, n_heads=8, n_kv_heads=4, head_dim=256,
                  sliding_window=1024, vocab_size=262208, multimodal=True,
                  hub_ids={"pt": "google/gemma-3-4b-pt", "it": "google/gemma-3-4b-it"}),
        ModelSize("12b", n_layers=48, d_model=3840, d_mlp=15360, n_heads=16, n_kv_heads=8, head_dim=256,
                  sliding_window=1024, vocab_size=262208, multimodal=True,
                  hub_ids={"pt": "google/gemma-3-12b-pt", "it": "google/gemma-3-12b-it"}),
        ModelSize("27b", n_layers=62, d_model=5376, d_mlp=21504, n_heads=32, n_kv_heads=16, head_dim=128,
                  sliding_window=1024, vocab_size=262208, multimodal=True, query_pre_attn_scalar=168,
                  hub_ids={"pt": "google/gemma-3-27b-pt", "it": "google/gemma-3-27b-it"}),
    ),
    # Gemma Scope 2's hook sites: transcoders read pre_feedforward_layernorm's output and stand in for
    # post_feedforward_layernorm's (the Architecture defaults); norms scale by 1 + w; embeddings by sqrt(d).
    architecture=Architecture(),
    model_classes={
        "gemma3_text": "Gemma3ForCausalLM",  # 270M, 1B
        "gemma3": "Gemma3ForConditionalGeneration",  # 4B, 12B, 27B (image-text; text stack under language_model)
    },
    text_stack_paths=("model.language_model", "model"),
    chat_template=GEMMA3_CHAT_TEMPLATE,
)

FAMILIES: tuple[ModelFamily, ...] = (GEMMA3,)

DEFAULT_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class ModelEntry:
    """A (size, variant) pair of a family: what a short name such as ``gemma-3-1b-it`` names."""

    family: ModelFamily
    size: ModelSize
    variant: Variant

    @property
    def name(self) -> str:
        return self.size.name(self.variant)

    @property
    def hub_id(self) -> str:
        return self.size.hub_id(self.variant)

    @property
    def gemma_scope_repo(self) -> str:
        return self.size.gemma_scope_repo(self.variant)

    @property
    def bundled_dictionaries(self) -> str | None:
        """The folder name of the dictionary set shipped for this model, or None."""
        return self.size.bundled_dictionaries.get(self.variant)


def all_entries() -> list[ModelEntry]:
    return [ModelEntry(f, s, v) for f in FAMILIES for s in f.sizes for v in ("pt", "it")]


def lookup(name: str) -> ModelEntry | None:
    """The entry a short name (``gemma-3-270m``, ``gemma-3-1b-pt``, ``gemma-3-4b-it``) or an official hub id
    names, or None. ``-pt`` may be written or left out."""
    for entry in all_entries():
        aliases = {entry.name, entry.hub_id, entry.hub_id.split("/")[-1]}
        if entry.variant == "pt":
            aliases.add(f"{entry.family.name}-{entry.size.size}-pt")
        if name in aliases:
            return entry
    return None


def match_config(n_layers: int, d_model: int, family: ModelFamily | None = None) -> ModelSize | None:
    """The size (of ``family``, or of any family) with this layer count and d_model in the size table, or None
    for a custom model. (Each size of a family has its own (n_layers, d_model) pair; heads and widths are not
    compared, so a model shrunk in its MLP still finds its size.)"""
    for candidate in FAMILIES if family is None else (family,):
        for size in candidate.sizes:
            if (size.n_layers, size.d_model) == (n_layers, d_model):
                return size
    return None


def family_of_model_type(model_type: str | None) -> ModelFamily | None:
    """The family whose checkpoints have this ``config.model_type``, or None."""
    return next((f for f in FAMILIES if model_type in f.model_classes), None)


def known_names() -> list[str]:
    return [e.name for e in all_entries()]
