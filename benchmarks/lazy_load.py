"""Loading a large float32 Gemma Scope 2 set with dtype=bfloat16: time and anonymous memory (issue 17, 4a and 5).

Writes a random set in the Gemma Scope 2 per-layer layout (default 18 layers x width 65536 x d_model 640, float32:
about 6 GB) to a temporary directory, then, each in a fresh process: loads it with ``dtype=torch.bfloat16`` and
encodes one 6-token prompt's MLP inputs (random x) on every layer, reading the active features' decoder rows.
It prints the load time, the encoding time and RssAnon (from /proc/self/status: anonymous memory, not the files'
page cache) after each step, first with an empty record of verified files (the NaN/inf scan runs), then with the
record it left (the scan is skipped); ``--cold`` first drops the set's files from the page cache. A set this
script wrote is deleted afterwards unless ``--keep``.

    OMP_NUM_THREADS=1 python benchmarks/lazy_load.py                      # this tree
    OMP_NUM_THREADS=1 python benchmarks/lazy_load.py --code OLD_CHECKOUT  # another checkout
    OMP_NUM_THREADS=1 python benchmarks/lazy_load.py --set DIR --keep --cold  # keep the set, read it from disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import json, sys, time, torch
from dictionaries.formats.registry import load_dictionaries
from dictionaries.replacement_mlp import decoder_rows

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

root, positions = sys.argv[1], int(sys.argv[2])
before = rss_anon()
start = time.perf_counter()
dicts = load_dictionaries(root, dtype=torch.bfloat16)
load_s = time.perf_counter() - start
loaded = rss_anon()
x = torch.randn(positions, dicts.d_model, generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
active = 0
for layer in range(dicts.n_layers):
    acts = dicts.encode(layer, x)
    pos, idx = acts.nonzero(as_tuple=True)
    rows = decoder_rows(dicts, layer, layer, idx, acts[pos, idx].float())
    active += int(idx.numel())
encode_s = time.perf_counter() - start
print(json.dumps({"load_s": load_s, "encode_s": encode_s, "rss_anon_loaded": loaded - before,
                  "rss_anon_encoded": rss_anon() - before, "active": active,
                  "code": __import__("dictionaries").__file__}))
"""


def write_set(root: Path, n_layers: int, width: int, d_model: int) -> int:
    """A random float32 Gemma Scope 2 per-layer set under ``root/transcoder_all``; returns its bytes."""
    import torch

    from dictionaries.safetensors_io import write_tensors

    total = 0
    gen = torch.Generator().manual_seed(0)
    for layer in range(n_layers):
        w_dec = torch.randn(width, d_model, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        tensors = {"w_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(width), "w_dec": w_dec,
                   "b_dec": torch.zeros(d_model), "threshold": torch.full((width,), 3.0)}  # ~90 per token
        write_tensors(root / "transcoder_all" / f"layer_{layer}_width_{width // 1000}k_l0_small" /
                      "params.safetensors", tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del w_dec, tensors
    return total


def evict(root: Path) -> None:
    """Drop the set's files (only them) from the page cache, so that the next load reads them from disk."""
    for path in root.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_case(code: Path, root: Path, record: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code), CIRCUITSCOPE_VERIFIED_FILES=str(record))
    env.setdefault("OMP_NUM_THREADS", "1")
    # cwd=code: ``python -c`` puts the working directory before PYTHONPATH on sys.path
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(root), "6"], env=env, check=True,
                         capture_output=True, text=True, cwd=code)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=REPO, help="The checkout to measure (default: this one).")
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--width", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--set", type=Path, help="Reuse (or write) the set here instead of a temporary directory.")
    parser.add_argument("--keep", action="store_true", help="Keep the set afterwards.")
    parser.add_argument("--cold", action="store_true", help="Evict the set from the page cache before each case.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lazy-load-"))
    root = args.set or work / "set"
    wrote = not (root / "transcoder_all").is_dir()
    try:
        if wrote:
            start = time.perf_counter()
            size = write_set(root, args.layers, args.width, args.d_model)
            print(f"wrote {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")
            time.sleep(3)  # files younger than RACY_SECONDS are not recorded as verified
        record = work / "verified_files.json"
        for case in ("empty record", "record kept"):
            if args.cold:
                evict(root)
            figures = run_case(args.code, root, record)
            print(f"{case:>12}: load {figures['load_s']:6.1f} s, RssAnon after load "
                  f"{figures['rss_anon_loaded'] / 2**20:7.1f} MiB, encode 6 tokens x {args.layers} layers "
                  f"{figures['encode_s']:5.2f} s ({figures['active']} active), RssAnon after "
                  f"{figures['rss_anon_encoded'] / 2**20:7.1f} MiB  [{figures['code']}]")
    finally:
        if args.set is None:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)  # the set and the record
        else:
            shutil.rmtree(work, ignore_errors=True)  # the record only
            if wrote and not args.keep:
                shutil.rmtree(args.set, ignore_errors=True)


if __name__ == "__main__":
    main()
