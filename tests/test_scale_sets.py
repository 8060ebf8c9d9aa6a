"""benchmarks/scale_sets.py: random Gemma Scope 2-layout sets written in chunks load with the package's loader, with
thresholds that give the asked L0 on the calibration prompt, and a sparse CLT's decoder rows are written exactly
for the features that can fire on its prompts (the rest are holes on disk).

Tiny model (4 layers, d_model 32) and widths that are not multiples of the chunk, so the chunked path and its tail
both run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dictionaries.formats.registry import load_dictionaries

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from scale_sets import SetSpec, ensure_set, is_current, mlp_inputs

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

CALIBRATION = "the capital of france is paris and the cat was in the tree one two three four five six seven"
PROMPT = "where is the red bird and the blue house"


def spec(tiny_lm, **overrides) -> SetSpec:
    settings = dict(model="tiny", n_layers=tiny_lm.n_layers, d_model=tiny_lm.d_model, width=1000, l0=6, chunk=96,
                    calibration=CALIBRATION)
    return SetSpec(**{**settings, **overrides})


def mean_l0(dicts, x: torch.Tensor) -> list[float]:
    """Mean active features per token of every layer, on inputs x [n_layers, T, d]."""
    return [float((dicts.encode(layer, x[layer]) > 0).sum(-1).float().mean()) for layer in range(dicts.n_layers)]


def test_per_layer_set_loads_with_selectors_and_has_the_l0(tiny_lm, tmp_path):
    s20 = ensure_set(spec(tiny_lm), tmp_path, lambda: tiny_lm, log=lambda _: None)
    s40 = spec(tiny_lm, l0=40, affine=False)
    ensure_set(s40, tmp_path, lambda: tiny_lm, log=lambda _: None)  # a second variant beside the first
    assert sorted(p.name for p in (tmp_path / "transcoder_all").iterdir())[:2] == [
        "layer_0_width_1k_l0_40", "layer_0_width_1k_l0_6_affine"]

    dicts = load_dictionaries(s20, width="1k", l0="6", affine=True)
    assert (dicts.kind, dicts.widths, dicts.has_skip) == ("skip-transcoder", [1000] * 4, True)
    x = mlp_inputs(tiny_lm, [CALIBRATION])
    for l0 in mean_l0(dicts, x):
        assert 3 <= l0 <= 12, l0  # within 2x of 6 (the threshold makes it exactly 6 on average)
    norms = dicts.decoder_weight(2, 2).norm(dim=-1)
    assert torch.allclose(norms, torch.ones(1000), atol=1e-5)
    enc = dicts.encoder_weight(1).norm(dim=0)
    assert 0.7 < float(enc.mean()) < 1.3  # columns ~ N(0, 1/d): norm ~1

    other = load_dictionaries(tmp_path, width="1k", l0="40", affine=False)
    assert (other.kind, other.has_skip) == ("transcoder", False)
    for l0 in mean_l0(other, x):
        assert 20 <= l0 <= 80, l0


def test_written_once_then_reused_and_rewritten_when_a_parameter_changes(tiny_lm, tmp_path):
    calls = []

    def model():
        calls.append(1)
        return tiny_lm

    first = spec(tiny_lm, width=200)
    ensure_set(first, tmp_path, model, log=lambda _: None)
    file = tmp_path / "transcoder_all" / "layer_3_width_200_l0_6_affine" / "params.safetensors"
    before = file.stat().st_mtime_ns
    ensure_set(first, tmp_path, model, log=lambda _: None)
    assert len(calls) == 1 and file.stat().st_mtime_ns == before
    reseeded = spec(tiny_lm, width=200, seed=1)
    assert not is_current(reseeded, tmp_path)
    ensure_set(reseeded, tmp_path, model, log=lambda _: None)
    assert len(calls) == 2 and is_current(reseeded, tmp_path) and not is_current(first, tmp_path)
    marker = json.loads((tmp_path / "scale_sets" / "width_200_l0_6_affine.json").read_text())
    assert marker["spec"]["seed"] == 1 and len(marker["layers"]) == 4


def test_sparse_clt_writes_decoders_of_the_features_active_on_its_prompts(tiny_lm, tmp_path):
    clt = spec(tiny_lm, architecture="cross-layer", affine=False, width=4000, chunk=1500, decoder_prompts=(PROMPT,))
    path = ensure_set(clt, tmp_path, lambda: tiny_lm, log=lambda _: None)
    dicts = load_dictionaries(path)
    assert (dicts.kind, dicts.widths) == ("clt", [4000] * 4)
    x = mlp_inputs(tiny_lm, [PROMPT])
    for layer in range(4):
        active = (dicts.encode(layer, x[layer]) > 0).any(0)
        assert active.sum() > 0
        for target in dicts.decoder_targets(layer):
            written = dicts.decoder_weight(layer, target).norm(dim=-1) > 0
            assert bool(written[active].all())  # every feature that fires has its decoders
            assert int(written.sum()) < 4000 // 4  # and most rows are zero
            expected = (1 / (4 - layer)) ** 0.5  # a row of norm 1 split over the n - i targets
            assert torch.allclose(dicts.decoder_weight(layer, target)[active].norm(dim=-1),
                                  torch.full((int(active.sum()),), expected), atol=1e-5)
    for l0 in mean_l0(dicts, mlp_inputs(tiny_lm, [CALIBRATION])):
        assert 3 <= l0 <= 12, l0
    file = path / "params_layer_0.safetensors"
    assert file.stat().st_blocks * 512 < 0.5 * file.stat().st_size  # the unwritten rows are holes
