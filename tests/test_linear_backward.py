"""The frozen model's backward (circuits/engine/linear_backward.py): the pattern product by blocks of keys skips
only what is exactly zero, and rows carried in bfloat16 stay close to float32.

The tiny model's sliding window (4) is shorter than the prompt, so with blocks of 2 keys a sliding layer's blocks
each meet only a band of queries and a global layer's blocks only the queries after them."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT
from test_attribution_edges import Frozen, check_columns, dense_rows, make_dictionaries, sample_sources

from circuits.engine import linear_backward
from circuits.engine.attribution import attribute
from circuits.settings import TraceSettings

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_key_blocks_cover_exactly_the_non_zero_pattern():
    torch.manual_seed(0)
    n, window = 11, 4
    query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
    pattern = torch.rand(2, n, n) * ((key <= query) & (query - key < window))  # [H, query, key]: sliding causal
    blocks = linear_backward.key_blocks(pattern.transpose(1, 2), block=3)
    assert blocks == [(0, 3, 0, 6), (3, 6, 3, 9), (6, 9, 6, 11), (9, 11, 9, 11)]
    covered = torch.zeros(n, n, dtype=torch.bool)  # [key, query]
    for k0, k1, q0, q1 in blocks:
        covered[k0:k1, q0:q1] = True
    assert covered[pattern.transpose(1, 2).ne(0).any(0)].all()


@pytest.fixture(scope="module")
def skip_set(tiny_lm):
    return make_dictionaries(tiny_lm, "per-layer", skip=True, seed=3)


def test_blocked_pattern_product_equals_the_dense_one_and_a_perturbation(tiny_lm, skip_set, monkeypatch):
    dense = attribute(tiny_lm, skip_set, PROMPT, TraceSettings(batch_size=16))
    monkeypatch.setattr(linear_backward, "KEY_BLOCK", 2)
    blocked = attribute(tiny_lm, skip_set, PROMPT, TraceSettings(batch_size=16))
    n = blocked.clean.n_positions
    layers = blocked.rows.backward.layers
    assert all(len(w.key_blocks) == (n + 1) // 2 for w in layers)
    assert any(q1 - q0 < n - k0 for w in layers for k0, _, q0, q1 in w.key_blocks), "no band was skipped"
    A, computed = dense_rows(blocked)
    A_dense, _ = dense_rows(dense)
    assert computed.all()
    torch.testing.assert_close(A, A_dense, rtol=1e-5, atol=1e-6 * float(A_dense.abs().max()))
    check_columns(Frozen(tiny_lm, skip_set, blocked), A, torch.arange(A.shape[0]), sample_sources(blocked))


def test_rows_carried_in_bfloat16_stay_within_a_few_percent_of_float32(tiny_lm, skip_set):
    att = attribute(tiny_lm, skip_set, PROMPT, TraceSettings(batch_size=16))
    ids = torch.arange(att.n_features)
    exact = att.rows.feature_rows(ids)
    rounded = att.rows.feature_rows(ids, dtype=torch.bfloat16)
    for a, b in zip(exact, rounded, strict=True):
        assert torch.equal(a.rows, b.rows) and b.values.dtype == torch.float32
        scale = a.values.abs().amax(1, keepdim=True).clamp_min(1e-12)
        error = ((a.values - b.values).abs() / scale).max()
        assert 0 < error < 0.03
