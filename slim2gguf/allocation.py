"""SBA: salience-determined bit allocation over column groups.

Candidates lower the i least salient groups to b−1 and raise the i most salient to
b+1 (i = 0 is uniform), so every candidate averages exactly b bits. Each is scored
by the KL divergence between softmax outputs of the round-to-nearest quantized layer
and the original one on calibration tokens; the search is incremental (candidate i
differs from i−1 in two groups), so all candidates cost about two full matmuls.
"""

from __future__ import annotations

import torch

from .quantizer import fit_minmax


def group_salience(weight: torch.Tensor, upper: torch.Tensor, group_size: int) -> torch.Tensor:
    """Σ over a group of δ_ij = w_ij² / U_jj² (U: upper Cholesky factor of H⁻¹)."""
    delta = weight.float().pow(2) / torch.diag(upper).pow(2)[None, :]
    return delta.sum(dim=0).view(-1, group_size).sum(dim=1)


def allocation_for(order: torch.Tensor, i: int, bits: int) -> list[int]:
    """Widths when the i least salient groups drop a bit and the i most salient gain one."""
    widths = [bits] * order.numel()
    for g in order[:i].tolist():
        widths[g] = bits - 1
    for g in order[order.numel() - i :].tolist() if i else []:
        widths[g] = bits + 1
    return widths


def _rtn_group(weight: torch.Tensor, width: int) -> torch.Tensor:
    params = fit_minmax(weight, width)
    return params.dequantize(params.codes(weight))


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(ref) || softmax(logits)) over output features."""
    logq = torch.log_softmax(logits, dim=-1)
    return float((ref_logp.exp() * (ref_logp - logq)).sum(dim=-1).mean())


def search_allocation(
    weight: torch.Tensor, upper: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int
) -> tuple[list[int], dict[str, float]]:
    """Best balanced allocation for ``weight`` [out, in] given calibration ``inputs`` [tokens, in].

    Returns the widths per group and a summary (chosen i, its KL, uniform KL)."""
    w = weight.float()
    x = inputs.float()
    n_groups = w.shape[1] // group_size
    order = torch.argsort(group_salience(w, upper, group_size), stable=True)
    ref_logp = torch.log_softmax(x @ w.T, dim=-1)
    cols = [slice(g * group_size, (g + 1) * group_size) for g in range(n_groups)]
    base = torch.cat([_rtn_group(w[:, c], bits) for c in cols], dim=1)
    logits = x @ base.T
    best_i, best_kl = 0, _kl(ref_logp, logits)
    uniform_kl = best_kl
    for i in range(1, n_groups // 2):
        lo, hi = cols[int(order[i - 1])], cols[int(order[n_groups - i])]
        logits += x[:, lo] @ (_rtn_group(w[:, lo], bits - 1) - base[:, lo]).T
        logits += x[:, hi] @ (_rtn_group(w[:, hi], bits + 1) - base[:, hi]).T
        kl = _kl(ref_logp, logits)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return allocation_for(order, best_i, bits), {"i": best_i, "kl": best_kl, "kl_uniform": uniform_kl}
