"""How edge_rows reads the sources of one layer from gradient rows (``_PositionGroups``): the same numbers as a
plain per-source dot product, with storage and read temporaries bounded by the real data however skewed the
number of sources per position is (issue 17: one unusual token with hundreds of active features)."""

from __future__ import annotations

import pytest
import torch

from circuits.engine.edge_rows import _PositionGroups

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

D = 16
BATCH = 3


def skewed_sources(n_positions: int = 40, busy: int = 17, busy_count: int = 500, seed: int = 0):
    """(nodes [n], positions [n], vectors [n, D], out_width): ~5 sources per position (some none), ``busy_count``
    at position ``busy``, in shuffled order, with node ids scattered over a wider row (gaps between them)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 11, (n_positions,), generator=gen)
    counts[busy] = busy_count
    counts[3] = 0
    positions = torch.repeat_interleave(torch.arange(n_positions), counts)
    positions = positions[torch.randperm(len(positions), generator=gen)]
    out_width = 2 * len(positions) + 7
    nodes = torch.randperm(out_width, generator=gen)[: len(positions)]
    vectors = torch.randn(len(positions), D, generator=gen)
    return nodes, positions, vectors, out_width


def per_source_dot(grad: torch.Tensor, nodes, positions, vectors, out_width: int) -> torch.Tensor:
    """The reference: out[:, node] = G[:, p] . vector, one source at a time, for sources at p < P'."""
    out = torch.zeros(grad.shape[0], out_width, dtype=torch.float64)
    for node, position, vector in zip(nodes.tolist(), positions.tolist(), vectors, strict=True):
        if position < grad.shape[1]:
            out[:, node] += grad[:, position].double() @ vector.double()
    return out


@pytest.mark.parametrize("n_read", [40, 30, 17, 18, 1])
def test_read_equals_per_source_dot_products(n_read):
    """Full prompt, and prefixes P' that stop before, at and after the busy position."""
    nodes, positions, vectors, out_width = skewed_sources()
    grad = torch.randn(BATCH, n_read, D, generator=torch.Generator().manual_seed(1))
    out = torch.full((BATCH, out_width), 0.5)  # read adds into what is there
    _PositionGroups(nodes, positions, vectors, 40).read(grad, out)
    expected = per_source_dot(grad, nodes, positions, vectors, out_width) + 0.5
    assert (positions < n_read).sum() > 0
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_no_sources_reads_nothing():
    out = torch.zeros(BATCH, 4)
    empty = torch.zeros(0, dtype=torch.long)
    _PositionGroups(empty, empty, torch.zeros(0, D), 5).read(torch.randn(BATCH, 5, D), out)
    assert not out.any()


def _tensors(obj, seen=None):
    """Every tensor reachable from ``obj`` through attributes and lists (each counted once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item, seen)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from _tensors(value, seen)


def test_stored_elements_are_bounded_by_the_real_sources():
    """One position with 500 sources must not pad the ~5 of every other position to 500 (the old layout stored
    P x 500 x d, ~27x the real vectors here)."""
    nodes, positions, vectors, _ = skewed_sources()
    n, n_positions = len(positions), 40
    tensors = list(_tensors(_PositionGroups(nodes, positions, vectors, n_positions)))
    stored_vectors = sum(t.numel() for t in tensors if t.is_floating_point())
    stored_indices = sum(t.numel() for t in tensors if not t.is_floating_point())
    assert n * D <= stored_vectors <= 2 * n * D
    assert stored_indices <= 4 * n + 3 * n_positions


def test_read_temporaries_are_bounded_by_the_real_sources(monkeypatch):
    """The [k, B, w] products of a read sum to at most 2x the B x n real dot products (the old read made one
    [P', B, 500] product)."""
    nodes, positions, vectors, out_width = skewed_sources()
    groups = _PositionGroups(nodes, positions, vectors, 40)
    sizes = []
    bmm = torch.bmm

    def recording_bmm(a, b):
        result = bmm(a, b)
        sizes.append(result.numel())
        return result

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    groups.read(torch.randn(BATCH, 40, D), torch.zeros(BATCH, out_width))
    assert sizes and BATCH * len(positions) <= sum(sizes) <= 2 * BATCH * len(positions)
