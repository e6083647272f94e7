"""Quantizing one linear layer with RTN, GPTQ or SliM (SBA + SQC + GPTQ)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import format as fmt
from .allocation import search_allocation
from .architectures import TENSOR_CLASSES
from .gptq import damped_hessian, gptq_blocks, gptq_order, gptq_quantize, inverse_cholesky_upper, rtn_quantize
from .qtensor import NativeTensor, QuantizedTensor
from .quantizer import fit_minmax, fit_sqc, fit_wls
from .refit import refit_native, refit_scales
from .sensitivity import SENSITIVITIES
from .storage import native_type, type_for
from .threads import few_threads

METHODS = ("slim", "gptq", "rtn")
NATIVE_BY_BUDGET = "auto"  # QuantSettings.native when --bpw chooses each linear's stock type
MAX_DAMP = 1e6  # GPTQ's corrections are then a millionth of the undamped ones; far past it the damped diagonal overflows float32
FITS = ("wls", "sqc")  # quantizer calibration objectives; wls measured best: docs/BENCHMARKS.md
DEFAULT_SQC_LAMBDA = 1.0  # measured best of {1, 4, 16} on the demo model: docs/BENCHMARKS.md


@dataclass(frozen=True)
class QuantSettings:
    """What decides the quantized weights (saved in the checkpoint manifest)."""

    method: str = "slim"
    bits: int = 3
    group_size: int = 128
    damp: float = 0.3  # ridge on H, fraction of mean diag(H): less overfit to the calibration text (docs/BENCHMARKS.md)
    sqc_lambda: float = DEFAULT_SQC_LAMBDA
    sba_tokens: int = 1024
    sba: bool = True
    sqc: bool = True
    tensors: tuple[str, ...] | None = None  # llama.cpp class names to quantize (None: every linear)
    fit: str = "wls"  # with sqc on: importance-weighted least squares, or SliM's SQC grid search
    bpw: float | None = None  # whole-file budget: per-tensor settings chosen by sensitivity (budget.py)
    sensitivity: str = "fisher"  # how the budget scores tensors: fisher or hessian (sensitivity.py)
    refit: bool = True  # slim: re-solve scales and offsets for GPTQ's codes (refit.py); measured: docs/BENCHMARKS.md
    native: str | None = None  # a stock ggml type (storage.NATIVE_TYPES) for every linear instead of SliM's; "auto": --bpw picks
    act_order: bool = False  # GPTQ visits columns by decreasing H_jj, groups fitted before the pass (gptq.gptq_blocks)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        fmt.slim_type(self.bits, self.group_size)
        if not (math.isfinite(self.damp) and 0 < self.damp <= MAX_DAMP):
            raise ValueError(f"--damp must be positive, at most {MAX_DAMP:g}, got {self.damp:g}")
        if not (math.isfinite(self.sqc_lambda) and self.sqc_lambda >= 0):
            raise ValueError(f"--sqc-lambda weighs the salient elements' error: it must be ≥ 0, got {self.sqc_lambda:g}")
        if self.sba_tokens < 1:
            raise ValueError(f"--sba-tokens must be ≥ 1, got {self.sba_tokens}")
        if self.fit not in FITS:
            raise ValueError(f"--fit must be one of {', '.join(FITS)}, got '{self.fit}'")
        if self.bpw is not None and self.method == "rtn":
            raise ValueError("--bpw measures sensitivity on calibration data: use --method slim or gptq")
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"--sensitivity must be one of {', '.join(SENSITIVITIES)}, got '{self.sensitivity}'")
        if self.tensors is not None and (not self.tensors or not set(self.tensors) <= set(TENSOR_CLASSES)):
            raise ValueError(f"tensors must be a non-empty selection of {', '.join(TENSOR_CLASSES)}")
        if self.act_order and self.method == "rtn":
            raise ValueError("--act-order orders GPTQ's columns: use --method slim or gptq")
        if self.native == NATIVE_BY_BUDGET and self.act_order:  # chosen by --bpw or reused from a decision (pipeline)
            raise ValueError("--act-order visits single columns; the IQ2/IQ3 types a stock-type budget may choose round runs of them: drop --act-order")
        if self.native is not None and self.native != NATIVE_BY_BUDGET:
            if native_type(self.native).span > 1 and self.act_order:
                raise ValueError(f"--act-order visits single columns; {self.native.upper()} rounds runs of them: drop one of the two")
            if self.bpw is not None:
                raise ValueError("--bpw chooses every tensor's stock type: drop --type")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a list for the selection, as it reads back from a manifest)."""
        data = asdict(self)
        if self.tensors is not None:
            data["tensors"] = list(self.tensors)
        if self.native is None:
            del data["native"]  # SliM runs keep the settings (and resume keys) they had before native output
        if not self.act_order:
            del data["act_order"]  # likewise for runs without act-order
        return data


def check_allocation(widths: list[int], n_groups: int, name: str) -> int:
    """The average width of a saved allocation, checked against the weight's groups."""
    if len(widths) != n_groups:
        raise ValueError(f"allocation for {name} has {len(widths)} groups, the weight has {n_groups}")
    if not widths or sum(widths) % len(widths) or sum(widths) // len(widths) not in (2, 3, 4):
        raise ValueError(f"allocation for {name}: its widths do not average exactly 2, 3 or 4 bits")
    bits = sum(widths) // len(widths)
    try:
        fmt.check_widths(torch.tensor(widths).numpy(), fmt.slim_type(bits, 32))
    except fmt.FormatError as err:
        raise ValueError(f"allocation for {name}: {err}") from err
    return bits


def quantize_native(weight: torch.Tensor, hessian: torch.Tensor | None, settings: QuantSettings) -> NativeTensor:
    """``weight`` [out, in] in the stock type ``settings.native``: GPTQ over the type's
    blocks, each block's scales fitted when GPTQ reaches it, weighted by the inputs'
    energy per column (diag H, as llama.cpp's importance matrix) for ``slim`` (then, with
    ``refit``, each row's free scales re-solved for the codes: refit.refit_native), evenly
    for ``gptq``; ``rtn`` rounds each block to its fit, no feedback. A weight whose rows
    the type's blocks do not divide gets the type's 32-wide fallback (storage.FALLBACK)."""
    stype = type_for(settings.native, weight.shape[1])
    size = stype.block_size
    if settings.method == "rtn":
        w = weight.float()
        even = torch.ones(size, device=w.device)
        with few_threads(w.device):
            fitted = [stype.fit(w[:, c : c + size], even) for c in range(0, w.shape[1], size)]
            codes = torch.cat([p.round_all(w[:, i * size : (i + 1) * size])[0] for i, p in enumerate(fitted)], dim=1)
        return NativeTensor.from_blocks(stype, codes.to(torch.uint8).cpu(), fitted)
    h, w = damped_hessian(hessian.float(), weight.float(), settings.damp)
    importance = torch.diag(h) if settings.method == "slim" else torch.ones(w.shape[1], device=w.device)
    upper, order = gptq_order(h, settings.act_order and stype.span == 1)  # --bpw's lattice picks keep GPTQ's order
    codes, fitted = gptq_blocks(
        w, upper, size, lambda wb, col: stype.fit(wb, importance[col : col + size]), span=stype.span, order=order
    )
    if settings.method == "slim" and settings.refit:
        fitted = refit_native(w, h, stype, codes, fitted)
    return NativeTensor.from_blocks(stype, codes, fitted)


def quantize_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    inputs: torch.Tensor | None,
    settings: QuantSettings,
    widths: list[int] | None = None,
) -> tuple[QuantizedTensor | NativeTensor, dict[str, float]]:
    """Quantize ``weight`` [out, in]; ``hessian`` (2/N Σ xxᵀ) and ``inputs`` (a token
    sample for SBA) come from calibration. ``widths`` reuses a saved allocation."""
    if settings.native is not None:
        return quantize_native(weight, hessian, settings), {}
    g = settings.group_size
    n_groups = weight.shape[1] // g
    uniform = [settings.bits] * n_groups
    if settings.method == "rtn":
        return rtn_quantize(weight.float(), widths or uniform, g, lambda w, k, _: fit_minmax(w, k)), {}
    h, w = damped_hessian(hessian.float(), weight.float(), settings.damp)
    upper_gptq, order = gptq_order(h, settings.act_order)
    info: dict[str, float] = {}
    if settings.method == "gptq":
        return gptq_quantize(w, upper_gptq, widths or uniform, g, lambda w_, k, _: fit_minmax(w_, k), order=order), info
    upper = upper_gptq if order is None else inverse_cholesky_upper(h)  # SBA's salience and SQC read H's factor in column order
    wls = settings.sqc and settings.fit == "wls"
    importance = torch.diag(h)
    if widths is None:
        if settings.sba:
            widths, info = search_allocation(w, upper, inputs, settings.bits, g, importance if wls else None)
        else:
            widths = uniform
    if wls:

        def fit(wg: torch.Tensor, k: int, cols: slice):
            return fit_wls(wg, k, importance[cols])
    elif settings.sqc:
        inv_u2 = torch.diag(upper).pow(-2)

        def fit(wg: torch.Tensor, k: int, cols: slice):
            return fit_sqc(wg, k, wg.pow(2) * inv_u2[cols][None, :], settings.sqc_lambda)
    else:

        def fit(wg: torch.Tensor, k: int, cols: slice):
            return fit_minmax(wg, k)

    qt = gptq_quantize(w, upper_gptq, widths, g, fit, order=order)
    return (refit_scales(w, h, qt) if settings.refit else qt), info
