"""Loading with a dtype converts lazily: the set keeps its memory-mapped weights and converts only the slices
a computation reads, with results equal to those of an eager conversion (see dictionaries/dictionary_set.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import PROMPT

from circuits.settings import TraceSettings
from circuits.tracing import trace
from dictionaries import dictionary_set
from dictionaries.assembly import random_dictionary_set
from dictionaries.config import ActivationConfig, DictionaryConfig
from dictionaries.formats.native import CONFIG_FILE, layer_file, load_native, save_native
from dictionaries.formats.registry import load_dictionaries
from dictionaries.replacement_mlp import decoder_rows
from dictionaries.safetensors_io import write_tensors

N_LAYERS, D_MODEL, WIDTH = 4, 32, 48
REPO = Path(__file__).resolve().parents[1]


def _saved(tmp_path: Path, architecture: str, skip: bool) -> Path:
    dicts = random_dictionary_set(N_LAYERS, D_MODEL, WIDTH, architecture=architecture, skip=skip, seed=11)
    with torch.no_grad():  # non-zero biases and thresholds, so that their conversion matters too
        for layer in range(N_LAYERS):
            dicts.encoder_bias(layer).copy_(torch.randn(WIDTH) * 0.1)
            dicts.decoder_bias(layer).copy_(torch.randn(D_MODEL) * 0.1)
            dicts.activation(layer).threshold.copy_(torch.rand(WIDTH) * 0.2)
    return save_native(dicts, tmp_path / f"{architecture}-{skip}")


def _eager(directory: Path) -> dictionary_set.DictionarySet:
    """The old conversion: every weight copied into bfloat16."""
    dicts = load_native(directory).to(dtype=torch.bfloat16)
    dicts.config.dtype = "bfloat16"
    return dicts


@pytest.mark.parametrize(("architecture", "skip"), [("per-layer", True), ("cross-layer", False),
                                                    ("cross-layer", True)])
def test_a_bfloat16_load_keeps_the_float32_maps_and_computes_like_an_eager_copy(tmp_path, architecture, skip):
    directory = _saved(tmp_path, architecture, skip)
    lazy = load_dictionaries(directory, dtype=torch.bfloat16)
    eager = _eager(directory)
    assert lazy.dtype == torch.bfloat16 and lazy.config.dtype == "bfloat16"
    file_size = (directory / layer_file(1)).stat().st_size
    for matrix in (lazy.encoder_weight(1), lazy.decoder_weight(1, lazy.decoder_targets(1)[-1]),
                   *([lazy.skip_weight(1)] if skip else [])):
        assert matrix.dtype == torch.float32
        assert matrix.untyped_storage().nbytes() == file_size  # still the mapping of the whole file

    x = torch.randn(5, D_MODEL)
    for layer in range(N_LAYERS):
        pre = lazy.pre_activations(layer, x)
        assert pre.dtype == torch.bfloat16
        assert torch.equal(pre, eager.pre_activations(layer, x))
        acts = lazy.encode(layer, x)
        assert torch.equal(acts, eager.encode(layer, x)) and int((acts != 0).sum()) > 0
        pos, idx = acts.nonzero(as_tuple=True)
        for target in lazy.decoder_targets(layer):
            for dtype in (torch.float32, torch.bfloat16):
                rows = decoder_rows(lazy, layer, target, idx, acts[pos, idx].float(), dtype)
                assert rows.dtype == dtype
                assert torch.equal(rows, decoder_rows(eager, layer, target, idx, acts[pos, idx].float(), dtype))
        writes = torch.randn(5, D_MODEL)
        assert torch.equal(lazy.layer_output(layer, writes, x), eager.layer_output(layer, writes, x))
        for name, tensor in lazy.layer_tensors(layer).items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, eager.layer_tensors(layer)[name])
    xs = [torch.randn(3, D_MODEL) for _ in range(N_LAYERS)]
    for got, want in zip(lazy(xs)[1], eager(xs)[1], strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_wide_matrices_are_converted_a_block_of_columns_at_a_time(tmp_path, monkeypatch):
    directory = _saved(tmp_path, "per-layer", True)
    lazy, eager = load_dictionaries(directory, dtype=torch.bfloat16), _eager(directory)
    converted = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out is not self and self.ndim == 2 and self.shape[0] == D_MODEL:  # blocks of W_enc, not x
            converted.append(tuple(self.shape))
        return out

    # 10 columns of W_enc: bfloat16 (the set's dtype), then the result dtype (bfloat16 too): 4 bytes an element
    monkeypatch.setattr(dictionary_set, "MAX_CONVERTED_BYTES", D_MODEL * 4 * 10)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    x = torch.randn(5, D_MODEL)
    pre = lazy.pre_activations(2, x)
    assert converted == [(D_MODEL, 10)] * 4 + [(D_MODEL, WIDTH - 40)]
    torch.testing.assert_close(pre, eager.pre_activations(2, x), rtol=0, atol=0)


def test_a_trace_with_a_lazily_converted_set_equals_one_with_an_eager_copy(tmp_path, tiny_lm):
    dicts = random_dictionary_set(tiny_lm.n_layers, tiny_lm.d_model, 40, skip=True, seed=4)
    directory = save_native(dicts, tmp_path / "set")
    settings = TraceSettings(batch_size=16)
    graphs = [trace(tiny_lm, d, PROMPT, settings).graph
              for d in (load_native(directory, dtype=torch.bfloat16), _eager(directory))]
    assert set(graphs[0].nodes) == set(graphs[1].nodes) and set(graphs[0].edges) == set(graphs[1].edges)
    assert len(graphs[0].edges) > 10
    for edge in graphs[0].edges:
        assert graphs[0].edges[edge]["weight"] == graphs[1].edges[edge]["weight"]


def test_materialize_converts_the_matrices_for_code_that_edits_them(tmp_path):
    lazy = load_dictionaries(_saved(tmp_path, "per-layer", True), dtype=torch.bfloat16)
    assert lazy.materialize() is lazy
    assert {p.dtype for p in lazy.parameters()} == {torch.bfloat16}


_CHILD = """
import json, sys, torch
from dictionaries.formats.registry import load_dictionaries
from dictionaries.replacement_mlp import decoder_rows

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
x = torch.randn(6, int(sys.argv[2]))
before = rss_anon()
dicts = load_dictionaries(sys.argv[1], dtype=torch.bfloat16)
loaded = rss_anon()
for layer in range(dicts.n_layers):
    acts = dicts.encode(layer, x)
    pos, idx = acts.nonzero(as_tuple=True)
    rows = decoder_rows(dicts, layer, layer, idx, acts[pos, idx].float())
    out = dicts.layer_output(layer, torch.zeros(6, x.shape[1]), x)
print(json.dumps({"loaded": loaded - before, "used": rss_anon() - before, "active": int(idx.numel())}))
"""


def _write_large_set(directory: Path, n_layers: int, d_model: int, width: int) -> int:
    """A float32 native set written layer by layer (cheap deterministic weights); returns its bytes."""
    config = DictionaryConfig(architecture="per-layer", skip=False, n_layers=n_layers, d_model=d_model,
                              widths=[width] * n_layers, activation=ActivationConfig(type="jumprelu"),
                              dtype="float32", source_format="trained")
    directory.mkdir()
    total = 0
    for layer in range(n_layers):
        pattern = (torch.arange(d_model * width) % 193 - 96).float().mul_(1e-3 / (layer + 1))
        tensors = {"W_enc": pattern.view(d_model, width), "b_enc": torch.zeros(width),
                   "W_dec": pattern.view(width, d_model).clone(), "b_dec": torch.zeros(d_model),
                   "threshold": torch.full((width,), 2.0 / (layer + 1))}  # ~5% active
        write_tensors(directory / layer_file(layer), tensors)
        total += sum(t.numel() * 4 for t in tensors.values())
        del pattern, tensors
    (directory / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    return total


def test_a_bfloat16_load_of_a_large_float32_set_allocates_little_memory(tmp_path):
    """RssAnon (anonymous memory, not the file's page cache) grows by far less than the bfloat16 copy the old
    conversion made (half the set: 128 MiB here) when loading and encoding a prompt on every layer."""
    n_layers, d_model, width = 4, 512, 16384
    size = _write_large_set(tmp_path / "large", n_layers, d_model, width)
    assert size > 256 * 2**20
    # a fixed mmap threshold: glibc then returns freed large blocks (the NaN scan's masks) instead of keeping them
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="131072",
               CIRCUITSCOPE_VERIFIED_FILES=str(tmp_path / "verified.json"))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), str(tmp_path / "large"), str(d_model)],
                            capture_output=True, text=True, env=env, check=True, timeout=300)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["active"] > 0
    assert measured["loaded"] < 8 * 2**20, measured
    assert measured["used"] < 48 * 2**20, measured  # one layer's W_enc in bfloat16 is 16 MiB
