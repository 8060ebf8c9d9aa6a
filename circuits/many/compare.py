"""Compare two groups of prompts feature by feature: difference of mean influence, effect size, permutation p.

Per prompt a feature's influence is its summed influence in that prompt's graph, 0 where it is absent (so
presence counts). ``difference`` = mean_A - mean_B; effect size ``d`` = difference / pooled standard deviation
(Cohen's d; 0 when both groups are constant); ``p`` = (1 + #{permutations with |difference| >= observed}) /
(1 + n_permutations), the group labels shuffled over the prompts of A and B with a fixed seed, all features and
all permutations at once (one matrix product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dictionaries.errors import CircuitscopeError

from .aggregate import GraphFeatures


@dataclass
class FeatureDifference:
    feature_key: str
    mean_a: float
    mean_b: float
    difference: float
    effect_size: float
    p_value: float
    label: str


def influence_matrix(reduced: list[GraphFeatures]) -> tuple[torch.Tensor, list[str]]:
    """[n_prompts, n_features] float64 influence (0 where absent) and the feature keys of its columns."""
    keys = sorted({k for g in reduced for k in g.influence})
    column = {k: j for j, k in enumerate(keys)}
    matrix = torch.zeros(len(reduced), len(keys), dtype=torch.float64)
    for i, g in enumerate(reduced):
        for k, v in g.influence.items():
            matrix[i, column[k]] = v
    return matrix, keys


def permutation_test(x: torch.Tensor, in_a: torch.Tensor, n_permutations: int = 1000, seed: int = 0,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` [P, F] values, ``in_a`` [P] bool -> (mean_a [F], mean_b [F], effect size [F], p-value [F])."""
    n_a, n_b = int(in_a.sum()), int((~in_a).sum())
    a, b = x[in_a], x[~in_a]
    mean_a, mean_b = a.mean(0), b.mean(0)
    observed = mean_a - mean_b
    var_a = a.var(0, unbiased=True) if n_a > 1 else torch.zeros_like(mean_a)
    var_b = b.var(0, unbiased=True) if n_b > 1 else torch.zeros_like(mean_b)
    pooled = (((n_a - 1) * var_a + (n_b - 1) * var_b) / max(n_a + n_b - 2, 1)).sqrt()
    effect = torch.where(pooled > 0, observed / pooled.clamp_min(1e-300), torch.zeros_like(observed))
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(n_permutations, len(in_a), generator=generator), dim=1)
    masks = in_a[order].to(x.dtype)  # [n_permutations, P]: a shuffled labelling per row
    diffs = masks @ x / n_a - (1 - masks) @ x / n_b  # [n_permutations, F]
    extreme = (diffs.abs() >= observed.abs() - 1e-12).sum(0)
    p = (1 + extreme).to(torch.float64) / (1 + n_permutations)
    return mean_a, mean_b, effect, p


def compare_groups(reduced: list[GraphFeatures], group_a: str, group_b: str, n_permutations: int = 1000,
                   seed: int = 0) -> list[FeatureDifference]:
    """Features ranked by |difference| of mean influence between ``group_a`` and ``group_b``."""
    chosen = [g for g in reduced if g.group in (group_a, group_b)]
    for name in (group_a, group_b):
        if not any(g.group == name for g in chosen):
            known = sorted({str(g.group) for g in reduced})
            raise CircuitscopeError(f"no traced prompt in group {name!r} (groups: {', '.join(known)})")
    if n_permutations < 1:
        raise CircuitscopeError("--permutations must be >= 1")
    x, keys = influence_matrix(chosen)
    in_a = torch.tensor([g.group == group_a for g in chosen])
    mean_a, mean_b, effect, p = permutation_test(x, in_a, n_permutations, seed)
    labels = {k: v for g in chosen for k, v in g.labels.items()}
    rows = [FeatureDifference(k, float(mean_a[j]), float(mean_b[j]), float(mean_a[j] - mean_b[j]),
                              float(effect[j]), float(p[j]), labels.get(k, "")) for j, k in enumerate(keys)]
    return sorted(rows, key=lambda r: (-abs(r.difference), r.feature_key))
