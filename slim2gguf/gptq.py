"""GPTQ: quantize a weight column by column, pushing each column's error onto the
columns not yet quantized through the upper Cholesky factor of the inverse Hessian."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .qtensor import QuantizedTensor
from .quantizer import GroupParams
from .threads import few_threads

GroupFitter = Callable[[torch.Tensor, int, slice], GroupParams]


def damped_hessian(hessian: torch.Tensor, weight: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damp H and handle dead inputs (H_jj = 0: set to 1, zero the weight column).

    Returns the damped H and the weight with dead columns zeroed (copies)."""
    h = hessian.clone()
    w = weight.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    return h, w


def inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor:
    """U with H⁻¹ = Uᵀ U (upper); raises a clear error if H is not positive definite."""
    try:
        lower = torch.linalg.cholesky(hessian)
        inverse = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError("a Hessian is not positive definite even after damping; raise --damp (e.g. 1)") from err


class ColumnQuantizer(Protocol):
    """A block's fitted quantizer (SliM's GroupParams, a stock type's BlockParams)."""

    def round(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and stored values of the block's column ``j`` (``w`` [rows])."""
        ...

    def round_span(self, w: torch.Tensor, j: int, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and stored values of columns ``j`` .. ``j + span``, rounded at once (``gptq_blocks(span=...)``)."""
        ...


def gptq_blocks(
    weight: torch.Tensor,
    upper: torch.Tensor,
    block_size: int,
    fit: Callable[[torch.Tensor, int], ColumnQuantizer],
    block_cols: int = 128,
    span: int = 1,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[ColumnQuantizer]]:
    """Quantize ``weight`` [rows, cols] column by column; each block's quantizer is
    fitted by ``fit(columns, first column)`` when GPTQ reaches the block, on the
    error-updated weights. Returns the codes (uint8 [rows, cols]) and the quantizer of
    each block.

    With ``order`` (act-order: a permutation of the columns, ``act_order(h)``), columns
    are visited in that order and ``upper`` must factor H permuted the same way; a
    block's columns are then scattered over the pass, so every block's quantizer is
    fitted before it, on the unquantized weights (static groups).

    With ``span`` > 1, runs of that many columns are rounded at once (a lattice type's
    grid point) and their error E = (W_c − Q_c) U_cc⁻¹ is fed back as column-by-column
    GPTQ would for those codes; each run is rounded under the diagonal of U_cc⁻¹ U_cc⁻ᵀ,
    the weight each column's error has in the loss that feedback leaves."""
    w = weight.clone().float()
    rows, cols = w.shape
    block_cols = max(block_size, block_cols // block_size * block_size)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    fitted: list[ColumnQuantizer] = []
    columns = list(range(cols))
    if order is not None:
        if span != 1:
            raise ValueError("act-order visits single columns: a type rounding runs of columns cannot use it")
        with few_threads(w.device):
            fitted = [fit(w[:, c : c + block_size], c) for c in range(0, cols, block_size)]
        columns = order.tolist()
        w = w[:, order]
    for i1 in range(0, cols, block_cols):
        i2 = min(i1 + block_cols, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        with few_threads(w.device):
            for i in range(0, i2 - i1, span):
                col = columns[i1 + i]
                if order is None and col % block_size == 0:
                    fitted.append(fit(w1[:, i : i + block_size], col))
                if span == 1:
                    q, value = fitted[col // block_size].round(w1[:, i], col % block_size)
                    codes[:, col] = q.to(torch.uint8).cpu()
                    err = (w1[:, i] - value) / u1[i, i]
                    w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
                    err1[:, i] = err
                    continue
                run = slice(i, i + span)
                inverse = torch.linalg.inv(u1[run, run])
                q, value = fitted[col // block_size].round_span(w1[:, run], col % block_size, (inverse * inverse).sum(1))
                codes[:, col : col + span] = q.to(torch.uint8).cpu()
                err = (w1[:, run] - value) @ inverse
                w1[:, i + span :] -= err @ u1[run, i + span :]
                err1[:, run] = err
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]  # one large matmul per block of columns: every thread
    return codes, fitted


def act_order(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing H_jj (ties in column order): GPTQ's act-order visits the
    inputs with the most energy first, while the most columns are left to absorb their error."""
    return torch.argsort(torch.diag(hessian), descending=True, stable=True)


def gptq_order(hessian: torch.Tensor, ordered: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The factor U and the column order ``gptq_blocks`` takes: GPTQ's own order (None), or
    act-order with U factoring H permuted the same way."""
    if not ordered:
        return inverse_cholesky_upper(hessian), None
    order = act_order(hessian)
    return inverse_cholesky_upper(hessian[order][:, order]), order


def gptq_quantize(
    weight: torch.Tensor,
    upper: torch.Tensor,
    widths: list[int],
    group_size: int,
    fit: GroupFitter,
    block_cols: int = 128,
    order: torch.Tensor | None = None,
) -> QuantizedTensor:
    """GPTQ into SliM groups: each group's quantizer is fitted at its width when GPTQ
    reaches it (before the pass with act-order's ``order``: gptq_blocks)."""
    codes, fitted = gptq_blocks(
        weight, upper, group_size, lambda wg, col: fit(wg, widths[col // group_size], slice(col, col + group_size)), block_cols,
        order=order,
    )
    d = torch.stack([p.d.cpu() for p in fitted], dim=1)
    m = torch.stack([p.m.cpu() for p in fitted], dim=1)
    return QuantizedTensor(codes, d, m, torch.tensor(widths, dtype=torch.uint8), group_size)


def rtn_quantize(weight: torch.Tensor, widths: list[int], group_size: int, fit: GroupFitter) -> QuantizedTensor:
    """Round to nearest, one fitted quantizer per (row, group), no error feedback."""
    rows, cols = weight.shape
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    d = torch.zeros(rows, cols // group_size, dtype=torch.float16)
    m = torch.zeros_like(d)
    with few_threads(weight.device):
        for g, width in enumerate(widths):
            cs = slice(g * group_size, (g + 1) * group_size)
            params = fit(weight[:, cs].float(), width, cs)
            codes[:, cs] = params.codes(weight[:, cs].float()).to(torch.uint8).cpu()
            d[:, g], m[:, g] = params.d.cpu(), params.m.cpu()
    return QuantizedTensor(codes, d, m, torch.tensor(widths, dtype=torch.uint8), group_size)
