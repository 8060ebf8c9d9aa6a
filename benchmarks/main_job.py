"""The main job's wall time, as a new user sees it: ``circuitscope trace "The capital of France is"`` with no other
flags (default model, shipped dictionaries, graph.json + graph.svg + graph.html).

Runs the installed command twice in fresh processes: first with an empty model cache (``CIRCUITSCOPE_CACHE``
pointing at a new folder, so the GGUF conversion is included), then again with that cache filled. Prints each
run's wall time and the summary the command printed. Target on the project machine (2 cores): under 120 s and
under 30 s.

    python benchmarks/main_job.py [--keep-cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"


def run_main_job(cache: Path, out: Path) -> tuple[float, str]:
    """Wall seconds and stdout of one ``circuitscope trace PROMPT --out OUT`` in a new process."""
    env = dict(os.environ, CIRCUITSCOPE_CACHE=str(cache), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "cli", "trace", PROMPT, "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the main job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-cache", type=Path, default=None, help="Use (and keep) this cache folder.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="circuitscope-main-job-"))
    cache = args.keep_cache or root / "cache"  # a new, empty folder unless --keep-cache names one
    try:
        for label, out in (("first run (empty cache)", root / "first"), ("later run (cached model)", root / "later")):
            seconds, stdout = run_main_job(cache, out)
            print(f"{label}: {seconds:.1f} s wall")
            print("  " + stdout.strip().replace("\n", "\n  "))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
