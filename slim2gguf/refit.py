"""Scales and offsets re-solved for fixed codes: after GPTQ has chosen every code, each
row's (d, m) of all its groups together minimize the layer's output error
(w − ŵ) H (w − ŵ)ᵀ, a linear least-squares problem in 2·groups unknowns per row. For a
stock type the unknowns are each block's free fp16 fields (its super-scale d, and its
dmin or offset m where it has one); sub-scales and mins stay as GPTQ's fit set them.

Why: GPTQ fits a group's quantizer once, when it reaches the group, on weights that
later columns' error feedback no longer sees; with the codes fixed, the best (d, m)
under the full Hessian couples the groups of a row and can only lower the error GPTQ
minimizes. Rows whose stored (fp16) result is not better keep their old quantizer.
"""

from __future__ import annotations

import torch

from .qtensor import QuantizedTensor
from .quantizer import storable_scale
from .storage import BlockParams, NativeType
from .storage.base import to_fp16
from .threads import few_threads

SYSTEM_ELEMENTS = 1 << 26  # rows solved at once × (2G)²: bounds the systems' memory (256 MB in float32)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per row (w − ŵ) H (w − ŵ)ᵀ: the row's squared output error on the calibration inputs."""
    err = weight - approx
    return ((err @ hessian) * err).sum(dim=1)


ONES = None  # the basis that is 1 in every column (SliM's offsets); last when present


def _normal_equations(bases: list[torch.Tensor | None], weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A θ = b per row for ŵ_j = Σ_k θ_{k,g(j)} u_k[j], one unknown per group and basis u_k
    ([rows, cols], or ONES): A = QᵀHQ, b = QᵀHw with Q = [diag(u_1)E, diag(u_2)E, …] (E: the
    column-to-group indicator). SliM's (d, m) are the bases (codes, ONES).

    The cost is one [rows, group] × [group, cols] matmul per group and basis: A's blocks
    are symmetric, so a basis that no later row-dependent basis needs fills only the
    columns from its group on and mirrors the rest, b comes from one wH, and the terms
    with ONES from H's group sums (measured: 40 % less time than every group's whole row)."""
    rows, cols = weight.shape
    groups = cols // group_size
    n = len(bases) * groups
    a = torch.empty(rows, n, n, dtype=weight.dtype, device=weight.device)
    h_sums = hessian.view(groups, group_size, cols).sum(dim=1)  # [G, cols]: Σ_{i∈g} H_ij

    def by_group(v: torch.Tensor) -> torch.Tensor:  # [rows, c] -> [rows, c / group_size]: sums over each group
        return v.view(rows, -1, group_size).sum(dim=2)

    wh = weight @ hessian  # [rows, cols]: (H w)_j per row
    b = torch.cat([by_group(wh if x is ONES else x * wh) for x in bases], dim=1)
    upper = torch.triu_indices(groups, groups, 1, device=weight.device)
    for i, x in enumerate(bases):
        own = slice(i * groups, (i + 1) * groups)
        if x is ONES:  # the same for every row: EᵀHE
            a[:, own, own] = h_sums.view(groups, groups, group_size).sum(dim=2)
        else:
            later = [j for j in range(i + 1, len(bases)) if bases[j] is not ONES]
            for g in range(groups):
                cs = slice(g * group_size, (g + 1) * group_size)
                first = 0 if later else g
                p = x[:, cs] @ hessian[cs, first * group_size :]  # [rows, cols from group `first`]: Σ_{i∈g} x_i H_ij
                a[:, i * groups + g, i * groups + first : (i + 1) * groups] = by_group(p * x[:, first * group_size :])
                for j in range(i + 1, len(bases)):
                    y, into = bases[j], slice(j * groups, (j + 1) * groups)
                    a[:, i * groups + g, into] = x[:, cs] @ h_sums[:, cs].T if y is ONES else by_group(p * y)
            block = a[:, own, own]
            block[:, upper[1], upper[0]] = block[:, upper[0], upper[1]]  # the lower triangle mirrors the upper
        for j in range(i):  # the lower blocks mirror the upper ones
            a[:, own, j * groups : (j + 1) * groups] = a[:, j * groups : (j + 1) * groups, own].transpose(1, 2)
    return a, b


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """θ = A⁻¹b per row, on one thread: torch 2.13's batched LU on the CPU (MKL) fails for
    systems above ~200 unknowns when it runs on several threads ("SLASWP parameter 6")."""
    with few_threads(a.device):
        return torch.linalg.solve(a, b)


def _ridged_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """θ = (A + εI)⁻¹b per row, ε a millionth of the row's mean diagonal (rows whose codes
    leave a group's scale undetermined). The ridge is added to A in place and its diagonal
    then put back as it was: a copy of A is the size of the systems' whole budget."""
    diagonal = a.diagonal(dim1=1, dim2=2)
    kept = diagonal.clone()
    diagonal.add_(1e-6 * kept.mean(dim=1, keepdim=True).clamp_min(1e-30))
    try:
        return _solve(a, b)
    finally:
        diagonal.copy_(kept)


LOSS_ROWS = 64  # rows whose systems are widened to float64 at once in _loss


def _loss(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """θᵀAθ − 2θᵀb per row: the output error up to the row's constant wHwᵀ (in float64: the
    constant is far larger than the differences compared), LOSS_ROWS rows at a time so the
    float64 copy stays small."""
    parts = []
    for r in range(0, a.shape[0], LOSS_ROWS):
        rs = slice(r, r + LOSS_ROWS)
        ar, br, tr = a[rs].double(), b[rs].double(), theta[rs].double()
        parts.append((tr * (torch.einsum("rij,rj->ri", ar, tr) - 2 * br)).sum(dim=1))
    return torch.cat(parts)


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
        a, b = _normal_equations([qt.codes[rs].to(h.device).float(), ONES], w[rs], h, qt.group_size)
        theta = _ridged_solve(a, b)
        new_d = storable_scale(theta[:, :groups])
        new_m = theta[:, groups:].to(torch.float16)
        old = torch.cat([d[rs], m[rs]], dim=1).to(h.device).float()
        new = torch.cat([new_d, new_m], dim=1).float()
        ok = torch.isfinite(theta).all(dim=1) & (theta[:, :groups] >= 0).all(dim=1)
        better = (ok & (_loss(a, b, new) < _loss(a, b, old))).cpu()
        d[rs] = torch.where(better[:, None], new_d.cpu(), d[rs])
        m[rs] = torch.where(better[:, None], new_m.cpu(), m[rs])
    return QuantizedTensor(qt.codes, d, m, qt.widths, qt.group_size)


def refit_native(weight: torch.Tensor, hessian: torch.Tensor, stype: NativeType, codes: torch.Tensor, fitted: list[BlockParams]) -> list[BlockParams]:
    """``fitted`` (one BlockParams per block, as GPTQ fitted them) with each row's free
    fp16 fields of all its blocks re-solved for GPTQ's ``codes`` under ``hessian``; a row
    whose stored result is not better keeps its fields."""
    rows, cols = codes.shape
    blocks = cols // stype.block_size
    free = stype.free_fields
    fields = {k: torch.stack([p.fields[k] for p in fitted], dim=1) for k in fitted[0].fields}  # [rows, blocks, ...]
    flat = {k: v.reshape(rows * blocks, *v.shape[2:]) for k, v in fields.items()}
    block_codes = codes.to(weight.device).reshape(rows * blocks, stype.block_size)
    bases = []
    for k in free:  # the weights each free field multiplies: all fields as stored, that one 1, the other free ones 0
        unit = {**flat, **{f: torch.full_like(flat[f], 1.0 if f == k else 0.0) for f in free}}
        bases.append(stype.values(block_codes, *stype.sub_scales(unit)).view(rows, cols))
    old = torch.cat([fields[k].float() for k in free], dim=1)  # [rows, len(free) * blocks]
    new = old.clone()
    w, h = weight.float(), hessian.float()
    chunk = max(1, SYSTEM_ELEMENTS // (len(free) * blocks) ** 2)
    for r0 in range(0, rows, chunk):
        rs = slice(r0, min(r0 + chunk, rows))
        a, b = _normal_equations([u[rs] for u in bases], w[rs], h, stype.block_size)
        theta = to_fp16(_ridged_solve(a, b)).float()
        better = torch.isfinite(theta).all(dim=1) & (_loss(a, b, theta) < _loss(a, b, old[rs]))
        new[rs] = torch.where(better[:, None], theta, old[rs])
    for i, k in enumerate(free):
        fields[k] = new[:, i * blocks : (i + 1) * blocks].to(torch.float16)
    return [stype.params({k: v[:, g] for k, v in fields.items()}) for g in range(blocks)]
