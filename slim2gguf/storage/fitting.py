"""Fitting a sub-block's scale (and offset) to its weights, weighted by importance.

The searches follow llama.cpp's ``make_qx_quants`` / ``make_qkx2_quants``: for a grid
of candidate scales around the one that maps the largest weight onto the end of the
level table, round the sub-block, solve the weighted least squares for the scale (and
offset) given those codes, and keep per sub-block the candidate with the least
weighted error. Arrays are [rows, n_sub, sub_size] with importance [n_sub, sub_size].
"""

from __future__ import annotations

import torch

from .base import to_fp16

STEPS = 8  # candidates each side of the extreme's scale
SYMMETRIC_SPREAD = 0.025  # relative step of the symmetric search (±20 % in all)
AFFINE_SPREAD = 0.1  # step in levels of the affine search, as make_qkx2_quants


def weights_of(importance: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Non-negative fitting weights [n_sub, sub_size]; all-zero importance weighs evenly."""
    a = importance.float().clamp_min(0)
    a = a if float(a.sum()) > 0 else torch.ones_like(a)
    return (a + 1e-6 * a.mean()).view(shape)


def fit_symmetric(x: torch.Tensor, a: torch.Tensor, levels: torch.Tensor, nearest) -> torch.Tensor:
    """Scale s [rows, n_sub] (either sign) of x ≈ s·level; ``nearest(x / s)`` gives codes."""
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    levels = levels.to(x.device)
    best_err = torch.full(x.shape[:-1], float("inf"), device=x.device)
    best = torch.zeros(x.shape[:-1], device=x.device)
    for end in (float(levels[0]), float(levels[-1])):
        for step in range(-STEPS, STEPS + 1):
            s = extreme / (end * (1 + SYMMETRIC_SPREAD * step))
            safe = torch.where(s != 0, s, torch.ones_like(s))
            lev = levels[nearest(torch.where(s != 0, x / safe, torch.zeros_like(x)))]
            num, den = (a * lev * x).sum(-1), (a * lev * lev).sum(-1)
            scale = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
            err = (a * (scale[..., None] * lev - x).pow(2)).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, scale, best)
    return best


def fit_affine(x: torch.Tensor, a: torch.Tensor, qmax: int, signed_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ≥ 0 and offset [rows, n_sub] of x ≈ scale·q + offset with q in 0..qmax. The
    offset is ≤ 0 unless ``signed_offset`` (the K-quants store it as a non-negative min
    that is subtracted; Q4_1 and Q5_1 as an fp16 of either sign)."""
    xmin = x.min(-1).values
    xmax = x.max(-1).values
    if not signed_offset:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    span = (xmax - xmin).clamp_min(1e-30)
    best_err = ((a * (x - xmin[..., None]).pow(2)).sum(-1)).where(xmax > xmin, torch.zeros_like(xmin))
    best_d = torch.where(xmax > xmin, span / qmax, torch.zeros_like(span))
    best_m = xmin.clone()
    sw = a.sum(-1)
    for step in range(-STEPS, STEPS + 1):
        iscale = (qmax + AFFINE_SPREAD * step) / span
        q = torch.round((x - xmin[..., None]) * iscale[..., None]).clamp_(0, qmax)
        sl, sl2 = (a * q).sum(-1), (a * q * q).sum(-1)
        sx, sxl = (a * x).sum(-1), (a * q * x).sum(-1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        d = torch.where(ok, (sw * sxl - sx * sl) / safe, torch.zeros_like(det))
        m = torch.where(ok, (sl2 * sx - sl * sxl) / safe, torch.zeros_like(det))
        positive = (m > 0) & (not signed_offset)  # the offset must not exceed 0: refit the scale alone
        d = torch.where(positive, sxl / sl2.clamp_min(1e-30), d).clamp_min(0)
        m = torch.where(positive, torch.zeros_like(m), m)
        err = (a * (d[..., None] * q + m[..., None] - x).pow(2)).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
        best_m = torch.where(better, m, best_m)
    return best_d, best_m


def quantize_scales(s: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s [rows, n] ≈ d·q with one fp16 d ≥ 0 per row and integers q in [lo, hi]: d is the
    least that keeps every q in range."""
    need = (s.clamp_min(0) / hi).amax(-1)
    if lo < 0:
        need = torch.maximum(need, (s.clamp_max(0) / lo).amax(-1))
    d = to_fp16(need)
    df = d.float()[:, None]
    safe = torch.where(df > 0, df, torch.ones_like(df))
    q = torch.where(df > 0, torch.round(s / safe), torch.zeros_like(s)).clamp_(lo, hi)
    return d, q
