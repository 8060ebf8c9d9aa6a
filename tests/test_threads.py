"""The torch thread count of the commands that run a model (cli/threads.py, ``--threads``): the rule as a pure
function, the cgroup quota reader, and the option reaching ``torch.set_num_threads`` before the work starts."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import PROMPT

import cli.threads as threads_module
from cli import main
from cli.threads import ThreadSettings, cgroup_cpu_quota, choose_threads, use_threads
from dictionaries.assembly import random_dictionary_set
from dictionaries.formats.native import save_native

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _auto(cores=2, quota=None, load=0.0, own_load=0.0, ceiling=64, requested=0, env=None):
    return choose_threads(requested, env, cores=cores, quota=quota, load=load, own_load=own_load, ceiling=ceiling)


@pytest.mark.parametrize(("inputs", "expected"), [
    (dict(cores=8, load=0.3), 8),  # idle machine: every core
    (dict(cores=2, load=1.2, own_load=0.1), 1),  # issue 13: one busy process on 2 cores
    (dict(cores=2, load=3.5), 1),  # overloaded: never below 1
    (dict(cores=4, load=1.9, own_load=1.0), 3),  # our own part of the load is not counted
    (dict(cores=4, load=1.5), 2),  # others' load rounds half up: 1.5 -> 2
    (dict(cores=4, load=1.49), 3),
    (dict(cores=16, quota=2.5), 2),  # cgroup quota: whole cores only
    (dict(cores=16, quota=0.5), 1),
    (dict(cores=2, quota=8.0), 2),  # a quota above the cores: the cores
    (dict(cores=16, ceiling=8), 8),  # never more than torch's default (physical cores)
    (dict(cores=16, quota=6.0, load=2.2, ceiling=8), 4),
])
def test_the_automatic_rule(inputs, expected):
    choice = _auto(**inputs)
    assert choice.threads == expected
    assert choice.reason.startswith("automatic: ")


def test_explicit_threads_and_omp_num_threads_come_first():
    explicit = _auto(cores=2, load=5.0, requested=3, env="1")
    assert (explicit.threads, explicit.reason) == (3, "--threads")
    env = _auto(cores=2, load=5.0, env="4")
    assert (env.threads, env.reason) == (4, "OMP_NUM_THREADS")
    for ignored in ("", "0", "-2", "two", " "):  # not a positive integer: the automatic choice
        assert _auto(cores=4, load=1.0, env=ignored).threads == 3, ignored
    assert _auto(cores=4, load=2.0).describe() == "2 threads (automatic: 4 usable cores, others' load 2.0)"
    assert _auto(cores=1).describe() == "1 thread (automatic: 1 usable core, others' load 0.0)"


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "250000 100000\n"}, 2.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected


def test_use_threads_sets_and_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads_module, "automatic_inputs",
                        lambda: {"cores": 3, "quota": None, "load": 1.2, "own_load": 0.0})
    torch.set_num_threads(3)  # the ceiling: torch's current count
    try:
        with use_threads(ThreadSettings()) as choice:
            assert choice.threads == 2 == torch.get_num_threads()
        assert torch.get_num_threads() == 3
        with use_threads(ThreadSettings(threads=1)) as choice:
            assert choice.reason == "--threads" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValueError):
        ThreadSettings(threads=-1)


# --- the option ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dictionary_dir(tmp_path_factory):
    return str(save_native(random_dictionary_set(4, 32, 16, seed=0), tmp_path_factory.mktemp("threads") / "d"))


def _trace_recording_threads(monkeypatch, tmp_path, checkpoint, dictionaries, *args):
    """Run `circuitscope trace` on the tiny model; return (result, every count given to torch.set_num_threads, the
    thread count when the model is loaded)."""
    import cli.trace_commands as trace_commands

    calls, at_load = [], []
    set_num_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_num_threads(n))[1])
    load = trace_commands.load_model_and_dictionaries
    monkeypatch.setattr(trace_commands, "load_model_and_dictionaries",
                        lambda *a, **k: (at_load.append(torch.get_num_threads()), load(*a, **k))[1])
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(checkpoint), "--dictionaries", dictionaries,
                                       "-o", str(tmp_path / "g.json"), "--no-drawings", "--batch-size", "16", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result, calls, at_load


def test_threads_option_reaches_torch_before_the_work(monkeypatch, tmp_path, tiny_checkpoint_dir, dictionary_dir):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result, calls, at_load = _trace_recording_threads(monkeypatch, tmp_path, tiny_checkpoint_dir, dictionary_dir,
                                                      "--threads", "2")
    assert calls == [2, 1] and at_load == [2]  # set before loading, restored afterwards
    assert torch.get_num_threads() == 1
    time_line = next(line for line in result.stdout.splitlines() if line.startswith("time"))
    assert time_line.endswith("; 2 threads (--threads)"), time_line


def test_omp_num_threads_is_respected_without_the_option(monkeypatch, tmp_path, tiny_checkpoint_dir,
                                                         dictionary_dir):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    result, calls, at_load = _trace_recording_threads(monkeypatch, tmp_path, tiny_checkpoint_dir, dictionary_dir)
    assert calls == [2, 1] and at_load == [2]
    assert "2 threads (OMP_NUM_THREADS)" in result.stdout


def test_threads_option_rejects_a_negative_count(tiny_checkpoint_dir, dictionary_dir):
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries",
                                       dictionary_dir, "--threads", "-1"])
    assert result.exit_code == 2 and "--threads" in result.output
