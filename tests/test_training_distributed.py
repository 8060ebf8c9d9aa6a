"""Two processes (torchrun, gloo, CPU) train the same dictionaries as one process: data parallel, and
layers sharded across the ranks. Equal up to float summation order (the ranks add partial sums)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import fast_config

from dictionaries.safetensors_io import read_tensors
from dictionaries.training import train

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "data-clt-jumprelu-skip": dict(kind="clt", activation="jumprelu", clt_skip=True, distributed="data"),
    "data-skip-transcoder-batchtopk-auxk": dict(kind="skip-transcoder", activation="batchtopk", distributed="data",
                                                width=128, k=2, dead_after_tokens=256),
    "layers-skip-transcoder-topk": dict(kind="skip-transcoder", activation="topk", distributed="layers"),
}


def _cli_arguments(config) -> list[str]:
    args = ["--model", config.model, "--kind", config.kind, "--width", str(config.width), "--activation",
            config.activation, "--tokens", str(config.tokens), "--data", config.data, "--out", str(config.out),
            "--context-length", str(config.context_length), "--batch-tokens", str(config.batch_tokens),
            "--buffer-batches", str(config.buffer_batches), "--harvest-batch", str(config.harvest_batch),
            "--lr", str(config.lr), "--distributed", config.distributed, "--no-progress"]
    if config.k is not None:
        args += ["--k", str(config.k)]
    if config.target_l0 is not None:
        args += ["--target-l0", str(config.target_l0)]
    if config.clt_skip:
        args.append("--skip")
    if config.dead_after_tokens is not None:
        args += ["--dead-after-tokens", str(config.dead_after_tokens)]
    return args


def run_torchrun(config, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "cli", "dictionaries", "train", *_cli_arguments(config)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path, name):
    one = fast_config(tiny_checkpoint_dir, text_file, tmp_path / "one", **CASES[name])
    two = one.model_copy(update={"out": tmp_path / "two"})
    train(one, tiny_lm)
    result = run_torchrun(two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {one.kind} (4 layers" in result.stdout
    for layer in range(4):
        a = read_tensors(tmp_path / "one" / f"layer_{layer}.safetensors")
        b = read_tensors(tmp_path / "two" / f"layer_{layer}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"layer {layer} {key}")
