"""Checkpoints: a run stopped halfway (step limit or Ctrl-C) and resumed ends with the same weights, bit for
bit, as one that never stopped; a resume with other settings is refused; checkpoints hold no pickle."""

from __future__ import annotations

import signal

import pytest
import torch
from training_helpers import fast_config

import dictionaries.training.trainer as trainer_module
from dictionaries.errors import CircuitscopeError
from dictionaries.safetensors_io import read_tensors
from dictionaries.training import train

pytestmark = pytest.mark.usefixtures("single_thread")

# 10 steps in blocks of 4 batches: stopping after step 5 leaves the run in the middle of block 1.
SETUPS = {
    "transcoder-topk": dict(kind="transcoder", activation="topk"),
    # wide and sparse, dead after one step without firing: AuxK is active from step 2 on
    "clt-jumprelu-skip-matryoshka-auxk": dict(kind="clt", activation="jumprelu", clt_skip=True, matryoshka=[8, 128],
                                              dead_after_tokens=256, width=128, target_l0=2),
    "skip-transcoder-batchtopk-auxk": dict(kind="skip-transcoder", activation="batchtopk", dead_after_tokens=256,
                                           width=128, k=2),
}


def _weights(directory, n_layers=4):
    return [read_tensors(directory / f"layer_{layer}.safetensors") for layer in range(n_layers)]


def assert_same_weights(a, b):
    for layer_a, layer_b in zip(_weights(a), _weights(b), strict=True):
        assert layer_a.keys() == layer_b.keys()
        for name in layer_a:
            assert torch.equal(layer_a[name], layer_b[name]), name


@pytest.fixture
def uninterrupted(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path_factory):
    done = {}

    def run(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "out"
            train(fast_config(tiny_checkpoint_dir, text_file, out, **SETUPS[name]), tiny_lm)
            done[name] = out
        return done[name]

    return run


@pytest.mark.parametrize("name", list(SETUPS))
def test_stopped_and_resumed_run_equals_uninterrupted_run(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path,
                                                          uninterrupted, name):
    out = tmp_path / "out"
    first = train(fast_config(tiny_checkpoint_dir, text_file, out, stop_after_steps=5, **SETUPS[name]), tiny_lm)
    assert not first.finished and first.step == 5
    assert (first.metrics.aux > 0) == ("auxk" in name)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["rank_0.safetensors", "state.json"]
    assert not (out / "config.json").exists()
    second = train(fast_config(tiny_checkpoint_dir, text_file, out, resume=True, **SETUPS[name]), tiny_lm)
    assert second.finished and second.step == 10 and second.tokens_seen == 2560
    assert_same_weights(out, uninterrupted(name))


def test_ctrl_c_writes_a_checkpoint_and_resume_continues_exactly(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path,
                                                                 uninterrupted, monkeypatch):
    real_step = trainer_module.train_step

    def step_with_ctrl_c(model, optimizer, x, y, config, ctx, slots, n_all, step, *rest):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
        return real_step(model, optimizer, x, y, config, ctx, slots, n_all, step, *rest)

    monkeypatch.setattr(trainer_module, "train_step", step_with_ctrl_c)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    first = train(fast_config(tiny_checkpoint_dir, text_file, out, **SETUPS["transcoder-topk"]), tiny_lm)
    assert not first.finished and first.metrics.stop and first.step == 4
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    train(fast_config(tiny_checkpoint_dir, text_file, out, resume=True, **SETUPS["transcoder-topk"]), tiny_lm)
    assert_same_weights(out, uninterrupted("transcoder-topk"))


def test_resume_with_other_settings_is_refused(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path):
    out = tmp_path / "out"
    train(fast_config(tiny_checkpoint_dir, text_file, out, stop_after_steps=2), tiny_lm)
    with pytest.raises(CircuitscopeError, match=r"width: 32 then, 64 now"):
        train(fast_config(tiny_checkpoint_dir, text_file, out, resume=True, width=64), tiny_lm)
    with pytest.raises(CircuitscopeError, match="--resume to continue it or --force"):
        train(fast_config(tiny_checkpoint_dir, text_file, out), tiny_lm)
    restarted = train(fast_config(tiny_checkpoint_dir, text_file, out, force=True, tokens=512), tiny_lm)
    assert restarted.finished and restarted.step == 2


def test_resume_of_a_finished_run_changes_nothing(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path):
    out = tmp_path / "out"
    train(fast_config(tiny_checkpoint_dir, text_file, out, tokens=512), tiny_lm)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = train(fast_config(tiny_checkpoint_dir, text_file, out, tokens=512, resume=True), tiny_lm)
    assert again.finished and again.dictionaries.n_layers == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_checkpoints_are_safetensors_and_json_only(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path):
    out = tmp_path / "out"
    train(fast_config(tiny_checkpoint_dir, text_file, out, stop_after_steps=2, activation="jumprelu"), tiny_lm)
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert files == ["rank_0.safetensors", "state.json"]
    tensors = read_tensors(out / "checkpoint" / "rank_0.safetensors")
    assert {"model.W_enc", "model.log_threshold", "model.in_scale", "model.tokens_since_fired",
            "rng.torch"} <= set(tensors)
    assert any(name.startswith("optim.") and name.endswith(".exp_avg_sq") for name in tensors)


def test_resume_with_another_token_count_shortens_the_run(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path):
    """--tokens may change on --resume: a 10-step run stopped after 3 steps and resumed as an 8-step run ends
    after step 8, with the learning rate of its last steps decaying to 0 over the new length's last 20%."""
    from dictionaries.training.step import learning_rate

    out = tmp_path / "out"
    train(fast_config(tiny_checkpoint_dir, text_file, out, stop_after_steps=3), tiny_lm)
    shorter = fast_config(tiny_checkpoint_dir, text_file, out, resume=True, tokens=256 * 8)
    result = train(shorter, tiny_lm)
    assert result.finished and result.step == 8 and result.tokens_seen == 256 * 8
    original = fast_config(tiny_checkpoint_dir, text_file, tmp_path / "unused")
    assert learning_rate(shorter, 7) < learning_rate(original, 7) == original.learning_rate
