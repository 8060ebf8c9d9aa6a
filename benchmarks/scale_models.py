"""A random-weight Gemma 3 checkpoint of a registry size (the 1B by default), built once for benchmarks/scale.py.

The layer count, d_model and MLP width come from the family registry (``dictionaries.models.registry``); the
attention shape, which the registry does not hold, from :data:`ATTENTION` (Gemma 3 1B: 4 query heads, 1 kv head,
head_dim 256). Everything else (vocabulary, rope, sliding window 512 with a full layer every sixth) is the cached
270M's config, and the tokenizer is the 270M's (the family shares it). Weights are the transformers initialisation
(normal, std 0.02; norm scales 0, i.e. x 1) from a fixed seed. Written to a temporary folder and moved into
place, with a marker holding the shape; reused while the marker matches.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dictionaries.models.default_model import ensure_default_checkpoint
from dictionaries.models.registry import lookup

ATTENTION = {"1b": {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256}}
MARKER = "scale_model.json"
_FULL_EVERY = 6  # Gemma 3: five sliding-window layers, then one global


def model_shape(size: str = "1b") -> dict:
    """The text-config overrides of registry size ``size``: layers, d_model, MLP width, attention heads."""
    entry = lookup(f"gemma-3-{size}")
    if entry is None or size not in ATTENTION:
        raise ValueError(f"no registry size {size!r} with a known attention shape ({', '.join(ATTENTION)})")
    n = entry.size.n_layers
    return {
        "num_hidden_layers": n, "hidden_size": entry.size.d_model, "intermediate_size": entry.size.d_mlp,
        **ATTENTION[size],
        "layer_types": ["full_attention" if (i + 1) % _FULL_EVERY == 0 else "sliding_attention" for i in range(n)],
    }


def is_random_model_current(directory: Path, shape: dict, seed: int = 0) -> bool:
    """Whether ``directory`` holds the random checkpoint of ``shape`` and ``seed``."""
    try:
        return json.loads((directory / MARKER).read_text()) == {"shape": shape, "seed": seed}
    except (OSError, ValueError):
        return False


def ensure_random_model(directory: Path, shape: dict, seed: int = 0) -> Path:
    """A checkpoint folder at ``directory`` with ``shape`` (text-config overrides) and random weights."""
    if is_random_model_current(directory, shape, seed):
        return directory
    wanted = {"shape": shape, "seed": seed}
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    base = ensure_default_checkpoint()
    settings = json.loads((base / "config.json").read_text())
    for key in ("architectures", "_model_name_or_path", "transformers_version", "dtype", "_sliding_window_pattern"):
        settings.pop(key, None)
    config = Gemma3TextConfig(**{**settings, **shape})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    directory.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        model.save_pretrained(build)
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(build)
        (build / MARKER).write_text(json.dumps(wanted))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(build, directory)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return directory
