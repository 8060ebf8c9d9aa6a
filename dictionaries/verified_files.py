"""A record of the dictionary files already found free of NaN and inf, so that a set is scanned once, not on
every load; and of other whole-file scans' results (:func:`scan_once`, e.g. whether a CLT file decodes to
layers before its source: half of a 262k CLT's 217 GB would be read on every load).

The scan (:func:`~dictionaries.safetensors_io.check_finite`) reads every byte: 22.5 GiB for a 262k Gemma Scope 2
set, most of a trace's loading time. After a clean scan of tensors memory-mapped from known files, the record
keeps one entry whose key is a hash of everything the result depends on:

- the check (:data:`CHECK`: NaN/inf, this version of it);
- each source file's resolved path, size, mtime_ns, ctime_ns and inode;
- each tensor's name, dtype, shape, strides and offset in its file's mapping (which bytes were read).

A later load with the same key skips the scan; a file that changed (a new size, time or inode) is scanned again
and a NaN in it still raises the clear error. A file modified less than :data:`RACY_SECONDS` before its scan
is not recorded: a change in the same tick of the file system's clock would leave its times as they were.

The record is JSON, ``{"version": 1, "entries": {key: {"check": name, "files": [paths], "at": unix time,
"result": value}}}`` (an entry without check and result, as older records wrote, is a clean NaN/inf scan), at
``$CIRCUITSCOPE_VERIFIED_FILES``, else ``verified_files.json`` in the circuitscope cache
(:func:`~dictionaries.models.default_model.cache_dir`). It is written atomically; an unreadable record counts as
empty and a failure to write it is ignored, so the record can only save a scan, never fail a load.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .atomic_output import write_text_atomic
from .models.default_model import cache_dir
from .safetensors_io import check_finite

ENV = "CIRCUITSCOPE_VERIFIED_FILES"
CHECK = "finite-v1"
RECORD_VERSION = 1
RACY_SECONDS = 2.0
MAX_ENTRIES = 4096


def record_path() -> Path:
    """Where the record lives: ``$CIRCUITSCOPE_VERIFIED_FILES``, else ``<cache>/verified_files.json``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else cache_dir() / "verified_files.json"


def check_finite_once(path: str | Path, tensors: Mapping[str, torch.Tensor], sources: Sequence[str | Path]) -> None:
    """:func:`check_finite` (DictionaryFileError naming ``path``) unless the record says these ``tensors``,
    memory-mapped from the files ``sources`` as they are now, were already found finite; a clean scan is
    recorded. ``sources`` empty: scanned every time."""
    def scan() -> bool:
        check_finite(path, tensors)  # raises on NaN/inf: only clean scans are recorded
        return True

    scan_once(CHECK, tensors, sources, scan)


def scan_once(check: str, tensors: Mapping[str, torch.Tensor], sources: Sequence[str | Path],
              scan: Callable[[], bool | int | float | str]) -> bool | int | float | str:
    """The result of ``scan()`` (a JSON value; ``check`` names the scan and its version) over ``tensors``,
    memory-mapped from the files ``sources``: read from the record when the same check of the same bytes of
    the same files (as they are now) was recorded, else run and recorded. ``sources`` empty: run every time."""
    started = time.time_ns()
    stats = _file_stats(sources)
    if stats is None:
        return scan()
    key = _key(check, stats, tensors)
    entry = _read_entries(record_path()).get(key)
    if isinstance(entry, dict):
        return entry.get("result", True)
    result = scan()
    if all(started - stat[2] >= RACY_SECONDS * 1e9 for stat in stats):
        _record(key, check, [stat[0] for stat in stats], result)
    return result


def _file_stats(sources: Sequence[str | Path]) -> list[tuple[str, int, int, int, int]] | None:
    """(resolved path, size, mtime_ns, ctime_ns, inode) per source, or None when there are none or one is
    not a regular file."""
    if not sources:
        return None
    stats = []
    for source in sources:
        try:
            resolved = Path(source).resolve(strict=True)
            st = resolved.stat()
        except OSError:
            return None
        stats.append((str(resolved), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return stats


def _key(check: str, stats: list[tuple[str, int, int, int, int]], tensors: Mapping[str, torch.Tensor]) -> str:
    views = sorted(
        [name, str(t.dtype), list(t.shape), list(t.stride()), t.storage_offset()] for name, t in tensors.items()
    )
    text = json.dumps({"check": check, "files": stats, "tensors": views})
    return hashlib.sha256(text.encode()).hexdigest()


def _read_entries(path: Path) -> dict[str, dict]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = raw.get("entries") if isinstance(raw, dict) and raw.get("version") == RECORD_VERSION else None
    return entries if isinstance(entries, dict) else {}


def _record(key: str, check: str, files: list[str], result: bool | int | float | str) -> None:
    """Add ``key`` (dropping older entries of the same check of the same files, and the oldest beyond
    :data:`MAX_ENTRIES`)."""
    path = record_path()
    entries = {k: v for k, v in _read_entries(path).items()
               if isinstance(v, dict) and (v.get("files") != files or v.get("check", CHECK) != check)}
    entries[key] = {"check": check, "files": files, "at": time.time(), "result": result}
    if len(entries) > MAX_ENTRIES:
        newest = sorted(entries, key=lambda k: entries[k].get("at", 0), reverse=True)[:MAX_ENTRIES]
        entries = {k: entries[k] for k in newest}
    try:
        write_text_atomic(path, json.dumps({"version": RECORD_VERSION, "entries": entries}) + "\n")
    except OSError:
        pass  # a read-only cache costs a scan on the next load, nothing more
