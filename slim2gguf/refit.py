"""Scales and offsets re-solved for fixed codes: after GPTQ has chosen every code, each
row's (d, m) of all its groups together minimize the layer's output error
(w − ŵ) H (w − ŵ)ᵀ, a linear least-squares problem in 2·groups unknowns per row.

Why: GPTQ fits a group's quantizer once, when it reaches the group, on weights that
later columns' error feedback no longer sees; with the codes fixed, the best (d, m)
under the full Hessian couples the groups of a row and can only lower the error GPTQ
minimizes. Rows whose stored (fp16) result is not better keep their old quantizer.
"""

from __future__ import annotations

import torch

from .qtensor import QuantizedTensor
from .quantizer import storable_scale

SYSTEM_ELEMENTS = 1 << 26  # rows solved at once × (2G)²: bounds the systems' memory (256 MB in float32)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per row (w − ŵ) H (w − ŵ)ᵀ: the row's squared output error on the calibration inputs."""
    err = weight - approx
    return ((err @ hessian) * err).sum(dim=1)


def _normal_equations(codes: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A θ = b for θ = (d_1…d_G, m_1…m_G) of each row: A = QᵀHQ, b = QᵀHw with Q = [diag(c)E, E]
    (E: the column-to-group indicator), built group by group with one [rows, cols] matmul each."""
    rows, cols = codes.shape
    groups = cols // group_size
    a = torch.empty(rows, 2 * groups, 2 * groups, dtype=codes.dtype, device=codes.device)
    b = torch.empty(rows, 2 * groups, dtype=codes.dtype, device=codes.device)
    for g in range(groups):
        cs = slice(g * group_size, (g + 1) * group_size)
        p = codes[:, cs] @ hessian[cs, :]  # [rows, cols]: Σ_{i∈g} c_i H_ij
        a[:, g, :groups] = (p * codes).view(rows, groups, group_size).sum(dim=2)
        a[:, g, groups:] = p.view(rows, groups, group_size).sum(dim=2)
        b[:, g] = (p * weight).sum(dim=1)
    a[:, groups:, :groups] = a[:, :groups, groups:].transpose(1, 2)
    h_sums = hessian.view(groups, group_size, cols).sum(dim=1)  # [G, cols]: Σ_{i∈g} H_ij
    a[:, groups:, groups:] = h_sums.view(groups, groups, group_size).sum(dim=2)  # EᵀHE
    b[:, groups:] = weight @ h_sums.T
    return a, b


def _loss(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """θᵀAθ − 2θᵀb per row: the output error up to the row's constant wHwᵀ (in float64: the
    constant is far larger than the differences compared)."""
    a, b, theta = a.double(), b.double(), theta.double()
    return (theta * (torch.einsum("rij,rj->ri", a, theta) - 2 * b)).sum(dim=1)


def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` with each row's (d, m) re-solved for its codes under ``hessian`` (the damped
    calibration Hessian GPTQ used, ``weight`` the weight it quantized)."""
    rows, cols = qt.shape
    groups = cols // qt.group_size
    d, m = qt.d.clone(), qt.m.clone()
    w = weight.float()
    h = hessian.float()
    chunk = max(1, SYSTEM_ELEMENTS // (2 * groups) ** 2)
    for r0 in range(0, rows, chunk):
        rs = slice(r0, min(r0 + chunk, rows))
        a, b = _normal_equations(qt.codes[rs].to(h.device).float(), w[rs], h, qt.group_size)
        ridged = a.clone()
        ridged.diagonal(dim1=1, dim2=2).add_(1e-6 * a.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True).clamp_min(1e-30))
        theta = torch.linalg.solve(ridged, b)
        new_d = storable_scale(theta[:, :groups])
        new_m = theta[:, groups:].to(torch.float16)
        old = torch.cat([d[rs], m[rs]], dim=1).to(h.device).float()
        new = torch.cat([new_d, new_m], dim=1).float()
        ok = torch.isfinite(theta).all(dim=1) & (theta[:, :groups] >= 0).all(dim=1)
        better = (ok & (_loss(a, b, new) < _loss(a, b, old))).cpu()
        d[rs] = torch.where(better[:, None], new_d.cpu(), d[rs])
        m[rs] = torch.where(better[:, None], new_m.cpu(), m[rs])
    return QuantizedTensor(qt.codes, d, m, qt.widths, qt.group_size)
