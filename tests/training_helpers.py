"""Shared pieces of the training and evaluation tests: a small text file, a fast config, one thread.

The fixtures (``text_file``, ``single_thread``) reach every test module through ``pytest_plugins`` in
conftest.py; import only the plain helpers (``from training_helpers import fast_config``). A module that wants
one thread says ``pytestmark = pytest.mark.usefixtures("single_thread")``: tiny models run faster on one thread,
and two OpenMP threads on a busy two-core machine can slow a step down by orders of magnitude.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import WORDS, torch_threads

from dictionaries.training import make_config


@pytest.fixture
def single_thread():
    with torch_threads(1):
        yield


def write_text(path: Path, documents: int = 300, seed: int = 0) -> Path:
    """Documents of 5-40 random words of the tiny vocabulary, separated by blank lines."""
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
                                for _ in range(documents)))
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "text.txt")


def fast_config(model_dir, text, out, **overrides):
    """A config for the tiny model: 16-token contexts, batches of 256 tokens, blocks of 4 batches."""
    settings = dict(
        model=str(model_dir), kind="transcoder", width=32, activation="topk", k=8, tokens=256 * 10,
        data=str(text), context_length=16, batch_tokens=256, buffer_batches=4, harvest_batch=8, out=str(out),
        lr=0.01, progress=False,
    )
    settings.update(overrides)
    if settings["activation"] == "jumprelu":
        settings.pop("k", None)
        settings.setdefault("target_l0", 8)
    return make_config(**settings)
