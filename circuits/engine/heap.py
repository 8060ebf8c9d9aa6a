"""Giving freed memory back to the system during a long attribution.

Attribution keeps thousands of row blocks alive while it frees the much larger temporaries of every batch (the
gradient rows [B, P, d], the row buffer [B, S]). glibc's allocator keeps freed memory in its heap when live
blocks sit above it, so the process's anonymous memory grew to about twice what it held: on a 1B-shaped model with
16k features, 33 tokens and a 7,500 budget, RssAnon reached 2.1 GB while 1.1 GB was live, and ``malloc_trim(0)``
gave the 1 GB back at once. The plan estimates live memory; :func:`return_freed_memory`, called between batches
of rows, keeps the process's memory at what it estimates. Elsewhere (no glibc: macOS, musl) it does nothing.

oneDNN (the CPU's bfloat16 matmuls) caches what it builds for every distinct matmul shape: its primitive cache
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, 1,024 entries) and ideep's (``LRU_CACHE_CAPACITY``, 1,024). Attribution's
shapes change with every batch (rows per layer, the positions a batch spans, the width classes it reads), so the
caches only grow: on a 256-token trace with bfloat16 rows (benchmarks/scale.py prune-256) RssAnon rose 1.41 GB
above what the process held during the attribution, where the plan counts 0.53 GB, and the excess stayed through
the graph's float32 recompute (peak 2.77 GB, estimate 1.72 GB); with both caches off it rose 0.24 GB (peak 1.61 GB,
estimate 1.95 GB). :func:`bound_onednn_caches` turns both off before the first bfloat16 matmul (``circuits.engine``
calls it on import); it costs ~0.1-0.3 ms per bfloat16 matmul call, which the attribution's matmuls (milliseconds to
seconds each) do not notice (measured: the same seconds with and without). A value the user set is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# oneDNN's primitive cache (either spelling) and ideep's LRU cache of matmul primitives: entries, 0 or 1 = none kept
ONEDNN_CACHE_VARIABLES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0", "LRU_CACHE_CAPACITY": "1"}
_ONEDNN_OLD_SPELLING = "DNNL_PRIMITIVE_CACHE_CAPACITY"


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no C library by that name, or one without malloc_trim (not glibc)
        return None


def return_freed_memory() -> bool:
    """Return the allocator's free heap memory to the system (glibc ``malloc_trim(0)``); True if it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def bound_onednn_caches() -> dict[str, str]:
    """Turn off oneDNN's per-shape caches (see the module docstring) unless the user set them; they are read when
    the first oneDNN matmul runs, so this must come before it. Returns the variables it set."""
    chosen = {}
    for name, value in ONEDNN_CACHE_VARIABLES.items():
        user_set = name in os.environ or (name.startswith("ONEDNN_") and _ONEDNN_OLD_SPELLING in os.environ)
        if not user_set:
            os.environ[name] = chosen[name] = value
    return chosen
