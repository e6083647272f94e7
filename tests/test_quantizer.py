"""Quantizer core on small matrices: RTN, GPTQ, SQC, 1-bit groups, stored-value exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slim2gguf import format as fmt
from slim2gguf.allocation import allocation_for, group_salience, search_allocation
from slim2gguf.gptq import damped_hessian, gptq_blocks, gptq_order, inverse_cholesky_upper
from slim2gguf.methods import QuantSettings, quantize_linear
from slim2gguf.qtensor import QuantizedTensor
from slim2gguf.quantizer import FIT_ROWS, SQC_GRID, fit_binary, fit_minmax, fit_sqc, fit_wls, salient_mask, storable_scale
from slim2gguf.refit import refit_scales
from slim2gguf.storage import native_type
from slim2gguf.storage.base import FIT_ELEMENTS
from slim2gguf.threads import few_threads


def layer_problem(seed: int, out: int = 96, inp: int = 256, tokens: int = 1024, outliers: bool = False):
    """Correlated inputs with uneven column scales; optionally planted outlier columns."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=gen) / inp**0.5 + torch.eye(inp)
    x = torch.randn(tokens, inp, generator=gen) @ mix * (0.5 + torch.rand(inp, generator=gen))
    w = torch.randn(out, inp, generator=gen) * 0.02
    if outliers:
        w[:, 64:96] *= 8
        x[:, 64:96] *= 3
    return w, x


def output_error(w: torch.Tensor, x: torch.Tensor, qt) -> float:
    ref = x @ w.T
    return float((x @ qt.dequantize().T - ref).pow(2).sum() / ref.pow(2).sum())


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_at_equal_bits(bits):
    w, x = layer_problem(bits)
    rtn, _ = quantize_linear(w, None, None, QuantSettings("rtn", bits, 32))
    gptq, _ = quantize_linear(w, hessian(x), x, QuantSettings("gptq", bits, 32))
    assert output_error(w, x, gptq) < 0.9 * output_error(w, x, rtn)


def test_slim_beats_gptq_at_two_bits_with_outlier_columns():
    w, x = layer_problem(7, outliers=True)
    gptq, _ = quantize_linear(w, hessian(x), x, QuantSettings("gptq", 2, 32))
    slim, info = quantize_linear(w, hessian(x), x[:512], QuantSettings("slim", 2, 32))
    assert info["i"] > 0
    assert output_error(w, x, slim) < 0.8 * output_error(w, x, gptq)


@pytest.mark.parametrize("method", ["rtn", "gptq", "slim"])
def test_stored_values_reproduce_quantizer_output(method):
    """dequant(packed bytes) == the weights the quantizer produced, bit for bit."""
    w, x = layer_problem(3)
    qt, _ = quantize_linear(w, hessian(x), x[:256], QuantSettings(method, 2, 64))
    from_file = fmt.dequantize(qt.pack(), qt.stype, w.shape[1])
    assert from_file.tobytes() == qt.dequantize().numpy().tobytes()


def test_storable_scale_clears_code_bit_and_sign():
    d = storable_scale(torch.tensor([0.3, 1e-3, 0.0, 7.0]))
    bits = d.view(torch.int16)
    assert int((bits & 1).sum()) == 0 and bool((bits >= 0).all())
    assert torch.allclose(d.float(), torch.tensor([0.3, 1e-3, 0.0, 7.0]), rtol=2e-3)


def test_binary_group_keeps_mean_and_levels():
    w = torch.randn(16, 64) + 3.0
    p = fit_binary(w)
    levels = p.dequantize(p.codes(w))
    lo, hi = p.m.float(), p.m.float() + p.d.float()
    assert torch.all((levels == lo[:, None]) | (levels == hi[:, None]))
    mu = w.mean(1)
    assert torch.allclose((lo + hi) / 2, mu, atol=1e-2)


def test_all_zero_group_is_exact():
    w = torch.zeros(4, 32)
    p = fit_minmax(w, 3)
    assert torch.equal(p.dequantize(p.codes(w)), w)


def sqc_loss(w, params, weight):
    err = params.dequantize(params.codes(w)) - w
    return (err.abs().pow(2.4) * weight).sum(1)


@pytest.mark.parametrize("width", [2, 3, 4, 5])
def test_sqc_never_worse_than_minmax(width):
    gen = torch.Generator().manual_seed(width)
    w = torch.randn(64, 128, generator=gen) * torch.linspace(0.1, 2, 128)
    salience = w.pow(2) * torch.rand(128, generator=gen)
    weight = torch.where(salient_mask(salience), 4.0, 1.0)
    sqc = fit_sqc(w, width, salience, lam=4.0)
    base = fit_minmax(w, width)
    assert torch.all(sqc_loss(w, sqc, weight) <= sqc_loss(w, base, weight))
    assert torch.any(sqc_loss(w, sqc, weight) < sqc_loss(w, base, weight))


def test_sqc_grid_is_the_specified_101_points():
    assert len(SQC_GRID) == 101 and SQC_GRID[0] == 1.0
    assert min(SQC_GRID) == pytest.approx(0.9) and max(SQC_GRID) == pytest.approx(1.1)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_balanced_with_exact_average(seed):
    gen = torch.Generator().manual_seed(seed)
    n_groups = int(torch.randint(2, 20, (1,), generator=gen))
    order = torch.randperm(n_groups, generator=gen)
    for bits, step in ((2, 1), (3, 1), (4, 1), (3, 2), (4, 2)):
        for i in range(n_groups // 2):
            widths = allocation_for(order, i, bits, step)
            assert sum(widths) == bits * n_groups
            assert widths.count(bits - step) == widths.count(bits + step) == i
            assert {widths[g] for g in order[:i].tolist()} <= {bits - step}  # the least salient move down


def test_sba_raises_planted_salient_block():
    w, x = layer_problem(11, outliers=True)
    h, w = damped_hessian(hessian(x), w, 0.01)
    upper = inverse_cholesky_upper(h)
    sal = group_salience(w, upper, 32)
    assert int(sal.argmax()) == 2
    for importance in (None, torch.diag(h)):  # SliM's scoring, and the least-squares fit's
        widths, info = search_allocation(w, upper, x[:512], 2, 32, importance)
        assert widths[2] == 3 and info["score"] <= info["score_uniform"]


def test_dead_columns_are_zeroed():
    w, x = layer_problem(5)
    x[:, 10] = 0
    qt, _ = quantize_linear(w, hessian(x), x, QuantSettings("gptq", 3, 32))
    deq = qt.dequantize()[:, 10]
    assert float(deq.abs().max()) <= float(qt.d.float()[:, 0].max()) / 2 + 1e-6


def weighted_loss(w, params, importance):
    return ((params.dequantize(params.codes(w)) - w).pow(2) * importance).sum(1)


@pytest.mark.parametrize("width", [2, 3, 4, 5])
def test_wls_never_worse_than_minmax_under_its_weights(width):
    gen = torch.Generator().manual_seed(10 + width)
    w = torch.randn(64, 128, generator=gen) * torch.linspace(0.1, 2, 128)
    importance = torch.rand(128, generator=gen).pow(3) * 10  # a few columns carry most input energy
    wls, base = fit_wls(w, width, importance), fit_minmax(w, width)
    assert torch.all(weighted_loss(w, wls, importance) <= weighted_loss(w, base, importance) * (1 + 1e-6))
    assert weighted_loss(w, wls, importance).sum() < 0.9 * weighted_loss(w, base, importance).sum()
    # stored as the format requires: fp16, non-negative scale with the width-code bit clear
    assert wls.d.dtype == wls.m.dtype == torch.float16 and torch.all(wls.d >= 0)
    assert torch.equal(storable_scale(wls.d.float()), wls.d)


def test_wls_handles_constant_and_zero_importance_groups():
    w = torch.full((4, 32), 0.25)
    p = fit_wls(w, 3, torch.ones(32))
    assert torch.allclose(p.dequantize(p.codes(w)), w, atol=1e-3)
    p = fit_wls(torch.randn(4, 32), 3, torch.zeros(32))  # no input energy: any finite quantizer
    assert torch.isfinite(p.d.float()).all() and torch.isfinite(p.m.float()).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_refit_lowers_the_output_error_and_keeps_codes(bits):
    w, x = layer_problem(20 + bits, outliers=True)
    plain, _ = quantize_linear(w, hessian(x), x[:512], QuantSettings("slim", bits, 32, refit=False))
    refit, _ = quantize_linear(w, hessian(x), x[:512], QuantSettings("slim", bits, 32))
    assert torch.equal(refit.codes, plain.codes) and torch.equal(refit.widths, plain.widths)
    assert output_error(w, x, refit) < 0.99 * output_error(w, x, plain)
    # stored as the format requires: fp16, non-negative scale with the width-code bit clear
    assert refit.d.dtype == refit.m.dtype == torch.float16 and torch.all(refit.d >= 0)
    assert torch.equal(storable_scale(refit.d.float()), refit.d)


def test_refit_never_worsens_a_row():
    w, x = layer_problem(7)
    h, wd = damped_hessian(hessian(x), w, 0.01)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8, w.shape, generator=gen, dtype=torch.uint8)  # codes no fit would pick
    qt = QuantizedTensor(codes, torch.full((96, 8), 0.01, dtype=torch.float16), torch.full((96, 8), -0.035, dtype=torch.float16), torch.full((8,), 3, dtype=torch.uint8), 32)
    out = refit_scales(wd, h, qt)
    before = ((wd - qt.dequantize()) @ h * (wd - qt.dequantize())).sum(dim=1)
    after = ((wd - out.dequantize()) @ h * (wd - out.dequantize())).sum(dim=1)
    assert torch.all(after <= before)


def test_refit_in_less_memory_gives_the_same_scales(monkeypatch):
    """The refit adds its ridge to the systems in place and widens them to float64 a few
    rows at a time: the systems come back unchanged, and the scales are those of a ridged
    copy and of one float64 pass over every row."""
    from slim2gguf import refit

    w, x = layer_problem(8)
    h, wd = damped_hessian(hessian(x), w, 0.01)
    plain, _ = quantize_linear(w, hessian(x), x[:512], QuantSettings("slim", 3, 32, refit=False, damp=0.01))
    a, b = refit._normal_equations([plain.codes.float(), refit.ONES], wd, h, 32)
    kept = a.clone()
    ridged = a.clone()
    ridged.diagonal(dim1=1, dim2=2).add_(1e-6 * a.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True).clamp_min(1e-30))
    assert torch.equal(refit._ridged_solve(a, b), refit._solve(ridged, b))
    assert torch.equal(a, kept)
    theta = refit._solve(ridged, b)
    chunked = refit._loss(a, b, theta)
    monkeypatch.setattr(refit, "LOSS_ROWS", a.shape[0])
    assert torch.equal(chunked, refit._loss(a, b, theta))
    out = refit_scales(wd, h, plain)
    monkeypatch.setattr(refit, "LOSS_ROWS", 1)
    again = refit_scales(wd, h, plain)
    assert torch.equal(out.d, again.d) and torch.equal(out.m, again.m)


def test_refit_keeps_a_row_whose_solution_does_not_fit_fp16():
    """Row 0's best scale (1e6) overflows fp16: its stored result would be inf, so it keeps
    GPTQ's quantizer; row 1 is solved normally."""
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 4, (2, 64), generator=gen, dtype=torch.uint8)
    w = codes.float() * torch.tensor([[1e6], [0.01]])
    d = torch.tensor([[60000.0, 60000.0], [0.008, 0.008]], dtype=torch.float16)
    qt = QuantizedTensor(codes, d, torch.zeros(2, 2, dtype=torch.float16), torch.full((2,), 2, dtype=torch.uint8), 32)
    out = refit_scales(w, torch.eye(64), qt)
    assert torch.equal(out.d[0], qt.d[0]) and torch.equal(out.m[0], qt.m[0])
    assert torch.isfinite(out.dequantize()).all()
    assert torch.allclose(out.d[1].float(), torch.full((2,), 0.01), rtol=1e-3)


def test_refit_in_row_chunks_equals_all_rows_at_once(monkeypatch):
    import slim2gguf.refit as refit_mod

    w, x = layer_problem(8)
    h, wd = damped_hessian(hessian(x), w, 0.01)
    qt, _ = quantize_linear(w, hessian(x), x[:512], QuantSettings("slim", 3, 32, refit=False))
    whole = refit_scales(wd, h, qt)
    monkeypatch.setattr(refit_mod, "SYSTEM_ELEMENTS", 7 * 16**2)  # 7 rows per chunk
    chunked = refit_scales(wd, h, qt)
    for part, full in ((chunked.d, whole.d), (chunked.m, whole.m)):
        # the same systems solved in other batches: float32 rounding may move a value that lies
        # on an fp16 rounding boundary by one step (seen on one CPU: 1 offset of 768), never more
        torch.testing.assert_close(part, full, rtol=2**-10, atol=2**-24)
        assert int((part != full).sum()) <= part.numel() // 100
    assert not torch.equal(whole.d, qt.d)


def test_refit_handles_zero_rows_and_constant_codes():
    w = torch.zeros(4, 64)
    w[1] = 0.5  # every code equal: d and m are not separable
    qt = QuantizedTensor(torch.zeros(4, 64, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.float16), torch.zeros(4, 2, dtype=torch.float16), torch.full((2,), 2, dtype=torch.uint8), 32)
    out = refit_scales(w, torch.eye(64), qt)
    assert torch.isfinite(out.dequantize()).all()
    assert torch.allclose(out.dequantize(), w, atol=1e-3)


class RunRecorder:
    """Rounds runs of columns to multiples of 0.01 at once and records what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def round_span(self, w: torch.Tensor, j: int, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = torch.round(w / 0.01) * 0.01
        self.seen.append((j, w.clone(), value))
        return torch.zeros_like(w, dtype=torch.long), value


@pytest.mark.parametrize("span", [4, 8])
def test_runs_rounded_at_once_feed_their_error_back_exactly(span):
    """GPTQ's loss identity for runs: whatever the codes, tr(ΔW H ΔWᵀ) = Σ ‖(W_c − Q_c) U_cc⁻¹‖²
    over the runs, W_c as GPTQ presented them. It holds only if each run's error reaches the
    later columns through U_cc⁻¹ (within the run's coupling included)."""
    w, x = layer_problem(3, out=8, inp=64)
    h, w = damped_hessian(hessian(x).double(), w.double(), 0.01)
    upper = inverse_cholesky_upper(h)
    recorder = RunRecorder()
    gptq_blocks(w, upper.float(), 16, lambda wb, col: recorder, block_cols=32, span=span)
    q = torch.cat([value for _, _, value in recorder.seen], dim=1).double()
    loss = float(torch.trace((w - q) @ h @ (w - q).T))
    runs = 0.0
    for i, (_, seen, value) in enumerate(recorder.seen):
        cols = slice(i * span, (i + 1) * span)
        runs += float(((seen - value).double() @ torch.linalg.inv(upper[cols, cols])).pow(2).sum())
    assert loss == pytest.approx(runs, rel=1e-3)


class ColumnRecorder:
    """A block's quantizer that rounds to multiples of 0.01, codes each column by its own
    index, and records what GPTQ showed it, in visiting order (shared ``seen``)."""

    def __init__(self, first: int, fitted_on: torch.Tensor, seen: list) -> None:
        self.first, self.fitted_on, self.seen = first, fitted_on.clone(), seen

    def round(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        value = torch.round(w / 0.01) * 0.01
        self.seen.append((self.first + j, w.clone(), value))
        return torch.full_like(w, self.first + j, dtype=torch.long), value


def test_act_order_visits_by_energy_and_feeds_error_back_exactly():
    """With act-order every block is fitted on the unquantized weights before the pass,
    columns are visited by decreasing H_jj, codes land in their own columns, and GPTQ's
    loss identity tr(ΔW H ΔWᵀ) = Σ_i ((w_i − q_i) / U_ii)² holds with U the factor of H
    permuted the same way (it fails if the order and the factor disagree)."""
    w, x = layer_problem(5, out=8, inp=64)
    h, w = damped_hessian(hessian(x).double(), w.double(), 0.01)
    upper, order = gptq_order(h, True)
    assert torch.equal(torch.diag(h)[order], torch.sort(torch.diag(h), descending=True).values)
    seen: list = []
    codes, fitted = gptq_blocks(w, upper.float(), 16, lambda wb, col: ColumnRecorder(col, wb, seen), block_cols=32, order=order)
    assert [c for c, _, _ in seen] == order.tolist()
    assert torch.equal(codes, torch.arange(64, dtype=torch.uint8).expand(8, 64))
    for b, quantizer in enumerate(fitted):
        assert torch.equal(quantizer.fitted_on, w[:, b * 16 : (b + 1) * 16].float())
    q = torch.zeros_like(w)
    for col, _, value in seen:
        q[:, col] = value.double()
    loss = float(torch.trace((w - q) @ h @ (w - q).T))
    columns = sum(float(((s - v).double() / upper[i, i]).pow(2).sum()) for i, (_, s, v) in enumerate(seen))
    assert loss == pytest.approx(columns, rel=1e-3)


@pytest.mark.parametrize("native", [None, "q3_k"])
def test_act_order_changes_nothing_where_inputs_are_independent(native):
    """With a diagonal H no column's error reaches another, so visiting order cannot matter:
    act-order must give the very file plain GPTQ gives (it fails if codes or scales land
    in the wrong columns or blocks); with correlated inputs it must not."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(16, 512, generator=gen) * 0.02
    x = torch.randn(2048, 512, generator=gen) * (0.2 + 2 * torch.rand(512, generator=gen))
    h = torch.diag(torch.diag(hessian(x)))
    for hess, same in ((h, True), (hessian(layer_problem(6, inp=512)[1]), False)):
        plain, _ = quantize_linear(w, hess, x[:512], QuantSettings("slim", 2, 64, native=native))
        ordered, _ = quantize_linear(w, hess, x[:512], QuantSettings("slim", 2, 64, native=native, act_order=True))
        assert torch.equal(ordered.dequantize(), plain.dequantize()) is same


def test_act_order_settings():
    with pytest.raises(ValueError, match="--act-order"):
        QuantSettings("rtn", act_order=True)
    with pytest.raises(ValueError, match="IQ3_S rounds runs"):
        QuantSettings("slim", native="iq3_s", act_order=True)
    assert "act_order" not in QuantSettings().to_dict()  # earlier checkpoints' resume keys stay valid
    assert QuantSettings(act_order=True).to_dict()["act_order"] is True


def test_not_positive_definite_is_a_clear_error():
    with pytest.raises(ValueError, match="--damp"):
        inverse_cholesky_upper(-torch.eye(4))


def test_settings_reject_bad_values():
    with pytest.raises(fmt.FormatError):
        QuantSettings("slim", 5, 64)
    with pytest.raises(fmt.FormatError):
        QuantSettings("slim", 3, 48)
    with pytest.raises(ValueError, match="method"):
        QuantSettings("awq", 3, 64)
    with pytest.raises(ValueError, match="--fit must be one of wls, sqc"):
        QuantSettings("slim", 3, 64, fit="mse")
    assert np.isclose(fmt.slim_type(3, 64).bits_per_weight, 3.5)


def test_refit_solves_wide_rows_on_a_multithreaded_host():
    """A row of 112 groups is a 224-unknown system: torch's batched LU fails above ~200
    unknowns on several threads, so the refit solves on one, whatever the caller's setting."""
    gen = torch.Generator().manual_seed(3)
    cols = 112 * 32
    codes = torch.randint(0, 8, (6, cols), generator=gen, dtype=torch.uint8)
    qt = QuantizedTensor(codes, torch.full((6, 112), 0.01, dtype=torch.float16), torch.full((6, 112), -0.035, dtype=torch.float16), torch.full((112,), 3, dtype=torch.uint8), 32)
    w = qt.dequantize() + 0.002 * torch.randn(6, cols, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = refit_scales(w, torch.eye(cols), qt)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    err = lambda t: (w - t.dequantize()).pow(2).sum(dim=1)  # noqa: E731
    assert torch.all(err(out) < err(qt))


def test_fits_of_many_rows_equal_those_of_each_row_alone():
    """Fits run FIT_ROWS rows (SliM's groups) or FIT_ELEMENTS weights (a stock type's
    blocks) at a time, on every thread inside GPTQ's loop: the result must not depend on
    that split or on the thread count."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(FIT_ROWS + 37, 128, generator=gen)
    imp = torch.rand(128, generator=gen)
    with few_threads(w.device):
        whole = fit_wls(w, 3, imp)
    rows = [fit_wls(w[r : r + 1], 3, imp) for r in range(w.shape[0])]
    assert torch.equal(whole.d, torch.cat([p.d for p in rows])) and torch.equal(whole.m, torch.cat([p.m for p in rows]))
    for name, size in (("q4_k", 256), ("iq4_nl", 32)):  # 256 and 2048 rows at a time
        stype, block, a = native_type(name), torch.randn(FIT_ELEMENTS // size + 37, size, generator=gen), torch.rand(size, generator=gen)
        with few_threads(block.device):
            whole = stype.fit(block, a)
        parts = [stype.fit(block[r : r + 100], a) for r in range(0, block.shape[0], 100)]
        assert all(torch.equal(whole.fields[k], torch.cat([p.fields[k] for p in parts])) for k in whole.fields)
