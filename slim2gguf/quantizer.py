"""Per-(row, group) quantizers in the stored representation: w = f32(d) * q + f32(m).

Every value the quantizer returns (codes, fp16 d and m, dequantized weights) is
exactly what docs/FORMAT.md stores, so GPTQ's error feedback and PyTorch evaluation
both see the packed model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import SCALE_VALUE_MASK
from .threads import every_thread

SQC_POWER = 2.4
SQC_GRID = torch.cat(
    [torch.ones(1), 1 + 0.002 * torch.arange(1, 51), 1 - 0.002 * torch.arange(1, 51)]
).tolist()
SALIENT_ZSCORE = 2.0


def storable_scale(d: torch.Tensor) -> torch.Tensor:
    """Round a non-negative scale to fp16 and clear the bit the format uses for the width code."""
    bits = d.clamp_min(0).to(torch.float16).view(torch.int16)
    return (bits & SCALE_VALUE_MASK).view(torch.float16)


@dataclass
class GroupParams:
    """Quantizer of one group for every row: fp16 ``d``, ``m`` [rows] and the width."""

    d: torch.Tensor
    m: torch.Tensor
    width: int

    def __post_init__(self) -> None:
        self._d = self.d.float()
        self._m = self.m.float()
        self._inv = torch.where(self._d > 0, 1 / self._d, torch.zeros_like(self._d))

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest stored level for each weight (0 where d = 0); ``w`` is [rows] or [rows, cols]."""
        m, inv = (self._m, self._inv) if w.dim() == 1 else (self._m[:, None], self._inv[:, None])
        return torch.round((w - m) * inv).clamp_(0, (1 << self.width) - 1)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        d, m = (self._d, self._m) if q.dim() == 1 else (self._d[:, None], self._m[:, None])
        return q * d + m

    def round(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and stored values of one column (``w`` [rows]); every column of a group shares one quantizer."""
        q = self.codes(w)
        return q, self.dequantize(q)


def _asymmetric(xmin: torch.Tensor, xmax: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (d, m) of min-max asymmetric quantization with an integer zero point."""
    maxq = (1 << width) - 1
    d = storable_scale((xmax - xmin) / maxq)
    df = d.float()
    safe = torch.where(df > 0, df, torch.ones_like(df))
    z = torch.round(-xmin / safe).clamp_(0, maxq)
    m = (-df * z).to(torch.float16)
    return d, m


def fit_binary(w: torch.Tensor) -> GroupParams:
    """1-bit group: w ≈ μ ± α per row, stored as m = μ − α, d = 2α."""
    mu = w.mean(dim=1)
    alpha = (w - mu[:, None]).abs().mean(dim=1)
    return GroupParams(d=storable_scale(2 * alpha), m=(mu - alpha).to(torch.float16), width=1)


def fit_minmax(w: torch.Tensor, width: int) -> GroupParams:
    """Asymmetric min-max over the group (range always includes 0, as GPTQ does)."""
    if width == 1:
        return fit_binary(w)
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    d, m = _asymmetric(xmin, xmax, width)
    return GroupParams(d, m, width)


def salient_mask(salience: torch.Tensor) -> torch.Tensor:
    """Elements whose salience has a z-score above 2 within the [rows, group] block."""
    std = salience.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(salience, dtype=torch.bool)
    return (salience - salience.mean()) / std > SALIENT_ZSCORE


def fit_sqc(w: torch.Tensor, width: int, salience: torch.Tensor, lam: float, chunk: int = 26) -> GroupParams:
    """Salience-weighted quantizer calibration: per row, the shrink/stretch of min-max
    (101-point grid) minimizing Σ weight·|Δ|^2.4, weight λ on salient elements, 1 elsewhere.
    Grid point 1 is plain min-max, so the loss never exceeds min-max's."""
    if width == 1:
        return fit_binary(w)
    weight = torch.where(salient_mask(salience), lam, 1.0).to(w.dtype)
    xmin0 = w.min(dim=1).values.clamp(max=0)
    xmax0 = w.max(dim=1).values.clamp(min=0)
    best_loss = torch.full_like(xmin0, float("inf"))
    best_d = torch.zeros_like(xmin0, dtype=torch.float16)
    best_m = torch.zeros_like(xmin0, dtype=torch.float16)
    grid = torch.tensor(SQC_GRID, dtype=w.dtype, device=w.device)
    for start in range(0, grid.numel(), chunk):
        p = grid[start : start + chunk, None]
        d, m = _asymmetric(p * xmin0, p * xmax0, width)
        params = GroupParams(d.flatten(), m.flatten(), width)
        wide = w.repeat(p.shape[0], 1)
        err = params.dequantize(params.codes(wide)) - wide
        loss = (err.abs().pow(SQC_POWER) * weight.repeat(p.shape[0], 1)).sum(dim=1).view(p.shape[0], -1)
        loss_min, arg = loss.min(dim=0)
        better = loss_min < best_loss
        rows = torch.arange(w.shape[0], device=w.device)
        best_loss = torch.where(better, loss_min, best_loss)
        best_d = torch.where(better, d[arg, rows], best_d)
        best_m = torch.where(better, m[arg, rows], best_m)
    return GroupParams(best_d, best_m, width)


WLS_STEPS = 20  # candidate scales around min-max's, as llama.cpp's make_qkx2_quants
FIT_ROWS = 256  # rows fitted at once: a fit's temporaries then stay in cache (10x faster for a group of 8960 rows)


def fit_wls(w: torch.Tensor, width: int, importance: torch.Tensor) -> GroupParams:
    """Importance-weighted least squares, as llama.cpp fits K-quants with an importance
    matrix: for each of a grid of scales around min-max's, round the group, then solve
    min Σ_j a_j (d·q_j + m − w_j)² for (d, m) in closed form; keep per row the candidate
    whose stored (fp16) quantizer has the least weighted error. ``importance`` [cols] is
    a_j (diag H: the inputs' energy per column). Min-max is a candidate, so the weighted
    error never exceeds min-max's. Rows are independent, so they are fitted FIT_ROWS at a
    time, on every thread though GPTQ and the SBA search call this from their one-thread
    loops (docs/BENCHMARKS.md)."""
    if width == 1:
        return fit_binary(w)
    with every_thread():
        fitted = [_fit_wls_rows(w[r : r + FIT_ROWS], width, importance) for r in range(0, w.shape[0], FIT_ROWS)]
    return GroupParams(torch.cat([d for d, _ in fitted]), torch.cat([m for _, m in fitted]), width)


def weighted_line(a: torch.Tensor, levels: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (last dimension summed), the (d, m) minimizing Σ_j a_j (d·l_j + m − w_j)² in
    closed form; d = 0 and m the weighted mean where the levels are all equal."""
    sw, sl, sl2 = a.sum(dim=-1), (a * levels).sum(dim=-1), (a * levels * levels).sum(dim=-1)
    sx, sxl = (a * w).sum(dim=-1), (a * levels * w).sum(dim=-1)
    det = sw * sl2 - sl * sl
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    d = torch.where(ok, (sw * sxl - sx * sl) / safe, torch.zeros_like(det))
    m = torch.where(ok, (sl2 * sx - sl * sxl) / safe, sx / sw.clamp_min(1e-30))
    return d, m


def _fit_wls_rows(w: torch.Tensor, width: int, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_wls's stored (d, m) [rows] for a few rows."""
    maxq = (1 << width) - 1
    a = importance.to(w.dtype).clamp_min(0)[None, None, :]
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    steps = torch.arange(-WLS_STEPS // 2, WLS_STEPS // 2 + 1, device=w.device, dtype=w.dtype)
    iscale = (maxq + 0.1 * steps[:, None]) / (xmax - xmin).clamp_min(1e-30)[None, :]  # [steps, rows]
    q = torch.round((w[None] - xmin[None, :, None]) * iscale[:, :, None]).clamp_(0, maxq)
    d, m = weighted_line(a, q, w[None])
    base_d, base_m = _asymmetric(xmin, xmax, width)
    d = torch.cat([storable_scale(d), base_d[None]]).float()
    m = torch.cat([m.to(torch.float16), base_m[None]]).float()
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    codes = torch.round((w[None] - m[..., None]) * inv[..., None]).clamp_(0, maxq)
    loss = (a * (codes * d[..., None] + m[..., None] - w[None]).pow(2)).sum(dim=2)
    best = loss.argmin(dim=0)
    rows = torch.arange(w.shape[0], device=w.device)
    return d[best, rows].to(torch.float16), m[best, rows].to(torch.float16)
