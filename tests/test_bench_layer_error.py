"""The pure parts of scripts/bench_layer_error.py: the exact choice of widths by measured
error, and learnable weight clipping's quantizers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import imported_script


@pytest.fixture(scope="module")
def bench():
    with imported_script("bench_layer_error") as module:
        yield module


@pytest.mark.parametrize("seed", range(4))
def test_cheapest_widths_is_the_brute_force_optimum(bench, seed):
    gen = torch.Generator().manual_seed(seed)
    groups, lo, hi, bits = 5, 1, 5, 3
    cost = torch.full((groups, hi + 1), math.inf, dtype=torch.float64)
    cost[:, lo:] = torch.rand(groups, hi - lo + 1, generator=gen, dtype=torch.float64).cumsum(1).flip(1)  # falls with width
    widths = bench.cheapest_widths(cost, bits * groups)
    total = sum(float(cost[j, k]) for j, k in enumerate(widths))
    feasible = (c for c in itertools.product(range(lo, hi + 1), repeat=groups) if sum(c) == bits * groups)
    optimum = min(sum(float(cost[j, k]) for j, k in enumerate(c)) for c in feasible)
    assert sum(widths) == bits * groups and all(lo <= k <= hi for k in widths)
    assert total == pytest.approx(optimum, rel=1e-12)


def test_cheapest_widths_moves_bits_to_the_group_that_gains_most(bench):
    cost = torch.tensor([[math.inf, 8.0, 2.0, 0.5], [math.inf, 100.0, 25.0, 6.0]], dtype=torch.float64)
    assert bench.cheapest_widths(cost, 4) == [1, 3]  # 8 + 6 < 2 + 25


def test_lwc_trains_clipping_that_lowers_the_output_error(bench, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=gen)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(16, 64, generator=gen) * 0.05
    w[:, 5] = 0.6  # outliers that min-max spends its range on

    def error(p):
        e = w - p.dequantize(p.codes(w))
        return float(((e @ h) * e).sum())

    trained = bench.lwc_quantizers(w, h, 2, 64)[0]
    monkeypatch.setattr(bench, "LWC_STEPS", 0)
    start = bench.lwc_quantizers(w, h, 2, 64)[0]  # σ(4) ≈ 0.98 of min-max
    assert torch.all(trained.d.float() <= bench.fit_minmax(w, 2).d.float() * (1 + 1e-3))
    assert error(trained) < 0.97 * error(start)


@pytest.mark.parametrize("levels", [[0.0, 0.6, 2.2, 3.0], [0.0, 1.5, 2.1, 3.0, 3.9, 4.5, 6.2, 7.0]])
def test_level_table_recovers_the_levels_the_weights_were_made_on(bench, levels):
    gen = torch.Generator().manual_seed(0)
    table = torch.tensor(levels)
    groups, size = 4096, 64
    q = torch.randint(0, len(levels), (groups, size), generator=gen)
    q[:, 0], q[:, 1] = 0, len(levels) - 1  # every group spans the table
    d = torch.rand(groups, 1, generator=gen) * 0.01 + 0.001
    m = -torch.rand(groups, 1, generator=gen) * d * len(levels)
    weights, width = [(table[q] * d + m).reshape(64, -1)], len(levels).bit_length() - 1
    assert bench.level_table(weights, width, size).tolist() == pytest.approx(levels, abs=0.02)
    assert not torch.allclose(bench.level_table(weights, width, size, iters=0), table, atol=0.05)  # not where it starts


def test_fit_table_stores_the_nearest_levels_and_beats_min_max(bench):
    gen = torch.Generator().manual_seed(1)
    table = torch.tensor([0.0, 0.8, 2.3, 3.0])
    w = torch.randn(32, 64, generator=gen) * 0.02
    importance = torch.rand(64, generator=gen) + 0.1
    p = bench.fit_table(w, table, importance)
    assert p.d.dtype == p.m.dtype == torch.float16
    stored = p.dequantize(p.codes(w))
    candidates = table[None, None, :] * p.d.float()[:, None, None] + p.m.float()[:, None, None]  # [rows, 1, levels]
    assert torch.equal((w[..., None] - candidates).abs().argmin(dim=-1), p.codes(w))  # no level nearer than the chosen one
    xmin, xmax = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    minmax = bench.TableParams(((xmax - xmin) / 3).half(), xmin.half(), 2, table)
    error = (importance * (stored - w) ** 2).sum(dim=1)
    assert torch.all(error <= (importance * (minmax.dequantize(minmax.codes(w)) - w) ** 2).sum(dim=1) * (1 + 1e-6))
    assert float(error.sum()) < 0.9 * float((importance * (minmax.dequantize(minmax.codes(w)) - w) ** 2).sum())
