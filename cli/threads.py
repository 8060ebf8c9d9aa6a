"""How many torch threads a command runs with (``--threads``; docs/design.md §7).

On a shared machine more threads than free cores is much slower than fewer: torch's threads spin-wait for each
other at every parallel region, and one that is descheduled stalls the rest (issue 13: two threads next to one
busy process on 2 cores made a trace 5x slower than one thread). The rule, :func:`choose_threads`:

1. ``--threads N`` with N > 0: N.
2. Else ``OMP_NUM_THREADS`` when the user set it to a positive integer: that (torch read it at start-up too).
3. Else automatic: ``usable = min(cores this process may run on (sched_getaffinity), floor(cgroup CPU quota))``,
   at least 1, and ``threads = max(1, usable - round(others' load))``, never more than torch's own default (one
   per physical core). Others' load is the 1-minute load average less this process's own part, estimated as its
   CPU seconds so far / 60 (the CLI chooses at start, when it is a few seconds old).

Inter-op threads are left alone: nothing here runs inter-op parallel work, and torch lets them be set only once
per process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ThreadSettings(BaseModel):
    """``threads``: torch threads, 0 for the automatic choice of :func:`choose_threads`."""

    model_config = ConfigDict(extra="forbid")

    threads: int = Field(default=0, ge=0)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # "--threads", "OMP_NUM_THREADS" or "automatic: ..."

    def describe(self) -> str:
        """``1 thread (automatic: 2 usable cores, others' load 1.3)``."""
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.reason})"


def choose_threads(requested: int, env: str | None, cores: int, quota: float | None, load: float,
                   own_load: float, ceiling: int) -> ThreadChoice:
    """The rule of the module docstring, as a pure function. ``requested``: ``--threads`` (0 = automatic);
    ``env``: OMP_NUM_THREADS or None; ``cores``: CPUs this process may run on; ``quota``: the cgroup's CPU
    quota in cores or None; ``load``: the 1-minute load average; ``own_load``: this process's part of it;
    ``ceiling``: torch's default thread count."""
    if requested > 0:
        return ThreadChoice(requested, "--threads")
    if env is not None and env.strip().isdigit() and int(env) > 0:
        return ThreadChoice(int(env), "OMP_NUM_THREADS")
    usable = max(1, cores if quota is None else min(cores, math.floor(quota)))
    others = max(0.0, load - own_load)
    threads = max(1, min(ceiling, usable - math.floor(others + 0.5)))
    return ThreadChoice(threads, f"automatic: {usable} usable core{'s' if usable != 1 else ''}, "
                                 f"others' load {others:.1f}")


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota in cores: cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"), else v1
    ``cpu/cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 = none). None when there is none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def automatic_inputs() -> dict[str, float | int | None]:
    """This machine's and this process's inputs to :func:`choose_threads` (all but ``requested``, ``env`` and
    ``ceiling``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    times = os.times()
    return {"cores": cores, "quota": cgroup_cpu_quota(), "load": load, "own_load": (times.user + times.system) / 60}


@contextmanager
def use_threads(settings: ThreadSettings) -> Iterator[ThreadChoice]:
    """Choose the thread count for ``settings`` and set it with ``torch.set_num_threads`` for the duration (the
    previous count is restored: in-process callers such as tests keep theirs)."""
    import torch

    previous = torch.get_num_threads()
    choice = choose_threads(settings.threads, os.environ.get("OMP_NUM_THREADS"), ceiling=previous,
                            **automatic_inputs())
    torch.set_num_threads(choice.threads)
    try:
        yield choice
    finally:
        torch.set_num_threads(previous)
