"""Store a trained dictionary set in bfloat16 where the package ships it (native format, written atomically).

    python tools/store_bundled.py TRAINED_DIR dictionaries/bundled_sets/NAME

Keeps the run's ``training.json`` next to it, so the shipped set says how it was made.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from dictionaries.formats.native import load_native, save_native


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    source, target = Path(argv[0]), Path(argv[1])
    dictionaries = load_native(source, dtype=torch.bfloat16)
    data = dictionaries.config.metadata.get("data")
    if data and Path(str(data)).exists():  # a path on the machine that trained it: keep only the file name
        dictionaries.config.metadata["data"] = Path(str(data)).name
    save_native(dictionaries, target, overwrite=True)
    if (source / "training.json").is_file():
        shutil.copyfile(source / "training.json", target / "training.json")
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f"stored {dictionaries.n_layers} layers in bfloat16 at {target} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
