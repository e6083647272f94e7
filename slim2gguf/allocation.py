"""SBA: salience-determined bit allocation over column groups.

Candidates lower the i least salient groups to b−1 and raise the i most salient to
b+1 (i = 0 is uniform), so every candidate averages exactly b bits. Each is scored on
calibration tokens by comparing the round-to-nearest quantized layer with the original;
the search is incremental (candidate i differs from i−1 in two groups), so all
candidates cost about two full matmuls.

Two scorings: SliM's (min-max rounding, KL divergence between the softmax of the two
outputs), kept with SliM's own quantizer calibration (SQC); and, with an importance
(the least-squares fit), each group rounded by the fit the quantizer uses and the
candidate scored by the squared output error, the quantity GPTQ minimizes. SliM's
scoring judges groups by a quantizer the file does not use, and lost to uniform widths
on the demo model (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import torch

from .quantizer import fit_minmax, fit_wls
from .threads import few_threads


def group_salience(weight: torch.Tensor, upper: torch.Tensor, group_size: int) -> torch.Tensor:
    """Σ over a group of δ_ij = w_ij² / U_jj² (U: upper Cholesky factor of H⁻¹)."""
    delta = weight.float().pow(2) / torch.diag(upper).pow(2)[None, :]
    return delta.sum(dim=0).view(-1, group_size).sum(dim=1)


def allocation_for(order: torch.Tensor, i: int, bits: int, step: int = 1) -> list[int]:
    """Widths when the i least salient groups drop ``step`` bits and the i most salient
    gain as many (the pipeline moves one bit; bench_layer_error.py measures two)."""
    widths = [bits] * order.numel()
    for g in order[:i].tolist():
        widths[g] = bits - step
    for g in order[order.numel() - i :].tolist() if i else []:
        widths[g] = bits + step
    return widths


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(ref) || softmax(out)) over output features."""
    ref_logp, logq = torch.log_softmax(ref, dim=-1), torch.log_softmax(out, dim=-1)
    return float((ref_logp.exp() * (ref_logp - logq)).sum(dim=-1).mean())


def _squared_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Squared output error relative to the output's energy."""
    return float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def search_allocation(
    weight: torch.Tensor,
    upper: torch.Tensor,
    inputs: torch.Tensor,
    bits: int,
    group_size: int,
    importance: torch.Tensor | None = None,
    step: int = 1,
) -> tuple[list[int], dict[str, float]]:
    """Best balanced allocation for ``weight`` [out, in] given calibration ``inputs`` [tokens, in].

    Without ``importance``, SliM's scoring (min-max, KL); with it ([in], the least-squares
    fit's weights), groups rounded by that fit and scored by squared output error.
    ``step``: the bits a moved group loses or gains. Returns the widths per group and a
    summary (chosen i, its score, the uniform one's)."""
    w = weight.float()
    x = inputs.float()
    n_groups = w.shape[1] // group_size
    order = torch.argsort(group_salience(w, upper, group_size), stable=True)
    cols = [slice(g * group_size, (g + 1) * group_size) for g in range(n_groups)]
    score = _kl if importance is None else _squared_error

    def rounded(c: slice, width: int) -> torch.Tensor:
        with few_threads(w.device):
            params = fit_minmax(w[:, c], width) if importance is None else fit_wls(w[:, c], width, importance[c])
            return params.dequantize(params.codes(w[:, c]))

    ref = x @ w.T
    base = torch.cat([rounded(c, bits) for c in cols], dim=1)
    out = x @ base.T
    best_i, best = 0, score(ref, out)
    uniform = best
    for i in range(1, n_groups // 2):
        lo, hi = cols[int(order[i - 1])], cols[int(order[n_groups - i])]
        out += x[:, lo] @ (rounded(lo, bits - step) - base[:, lo]).T
        out += x[:, hi] @ (rounded(hi, bits + step) - base[:, hi]).T
        value = score(ref, out)
        if value < best:
            best_i, best = i, value
    return allocation_for(order, best_i, bits, step), {"i": best_i, "score": best, "score_uniform": uniform}
