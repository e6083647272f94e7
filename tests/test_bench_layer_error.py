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
