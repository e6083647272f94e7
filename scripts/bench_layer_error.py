"""Layer-level quantizer ablations: the relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)
of one class of linears, quantized with variants of the quantizer, in seconds per variant.

Why: the frontier harness (bench_frontier.py) measures what users see, the model's KL
divergence, but needs a file and a llama.cpp run per setting; this measures the quantity
GPTQ minimizes on the same calibration inputs, side by side, to decide which changes
deserve a frontier run. Inputs are captured from the float model (every other linear
float), on the calibration windows bench_frontier's files use (32 × 512 tokens of
WikiText-2 valid, seed 0), and on as many held-out windows (WikiText-2 test, the text the
frontier's KLD is measured on, when present): each cell reads "calibration / held-out".
GPTQ fits the calibration inputs' Hessian, so a gain there need not reach the KLD; the
held-out error is the closer proxy (docs/BENCHMARKS.md, "GPTQ's gain on held-out inputs").

    python scripts/bench_layer_error.py --model smollm2-135m --tensor ffn_down --blocks 1,8,16,24

Variants: ``default`` (the quantizer as it stands), ``no-refit`` (scales as GPTQ fitted
them), ``no-sba`` (uniform widths), ``sba-slim`` (widths from SliM's min-max/KL scoring),
``act-order`` (``--act-order``: GPTQ visits columns by decreasing H_jj, each group's
quantizer fitted before the pass on the unquantized weights, then refitted).

A wider range of widths per group (each then through GPTQ and the refit; the cell says
how many groups left the average width): ``sba-2`` (SBA's candidates moving groups ±2
bits), ``dp-1``, ``dp-2``, ``dp-any`` (widths over b±1, b±2 or 1-8 bits chosen by each
group's own error, the least-squares fit's rounding under its diagonal block of H, by an
exact dynamic program at exactly b bits on average; the cell also gives the largest
group error at b bits over the smallest), ``forced-1``, ``forced-2`` (an eighth of the
groups, the least salient, down 1 or 2 bits and an eighth, the most salient, up as many).
Learnable weight clipping (SliM-LLM+, after OmniQuant): ``rtn-minmax``, ``rtn-wls``
(round to nearest with min-max or the least-squares fit), ``rtn-lwc`` (per row and group,
clip factors σ(γ)·max and σ(β)·min trained by Adam through straight-through rounding on
the calibration output error), ``lwc-gptq`` (LWC's quantizers as GPTQ's, then the refit).

    python scripts/bench_layer_error.py --variants no-sba,default,sba-2,dp-1,dp-2,dp-any,forced-1,forced-2
    python scripts/bench_layer_error.py --variants rtn-minmax,rtn-wls,rtn-lwc,default,lwc-gptq

Non-uniform levels per width (uniform widths; compare with ``no-sba`` and ``rtn-wls``):
``rtn-table``, ``table`` (round to nearest, or GPTQ then the refit, with each group's
weights stored as w = d·T[q] + m, T a table of 2^b levels per width fitted once by Lloyd's
algorithm on rows of the same linear in every block not measured, and (d, m) fitted by
the least-squares fit over the table's levels).

    python scripts/bench_layer_error.py --variants rtn-wls,rtn-table,no-sba,table

``--native q4_k,q2_k`` measures stock types instead (``--format native``): ``rtn`` (each
block fitted evenly, rounded), ``gptq`` (GPTQ, blocks fitted evenly), ``slim`` (fitted
by the inputs' energy), ``slim+refit`` (then each row's free scales re-solved),
``+act-order`` (and GPTQ by decreasing H_jj; blocks fitted before the pass).
``--llama-types Q4_K,Q2_K`` adds the same error of llama-quantize's tensors, read from the
tensor-level files bench_frontier made (``--tensors TENSOR``, same calibration text).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim2gguf.allocation import allocation_for, group_salience, search_allocation  # noqa: E402
from slim2gguf.architectures import TENSOR_CLASSES  # noqa: E402
from slim2gguf.calib import windows_from_text  # noqa: E402
from slim2gguf.gptq import damped_hessian, gptq_quantize, inverse_cholesky_upper, rtn_quantize  # noqa: E402
from slim2gguf.methods import QuantSettings, quantize_linear  # noqa: E402
from slim2gguf.models import block_linears, decoder_layers, load_model, load_tokenizer, resolve_model  # noqa: E402
from slim2gguf.pipeline import BATCH, InputCollector, token_sample  # noqa: E402
from slim2gguf.quantizer import WLS_STEPS, GroupParams, fit_minmax, fit_wls, storable_scale, weighted_line  # noqa: E402
from slim2gguf.refit import output_error, refit_scales  # noqa: E402
from slim2gguf.storage import native_type  # noqa: E402

VARIANTS = ("default", "no-refit", "no-sba", "sba-slim", "act-order")
WIDE_VARIANTS = {"sba-2": 2, "dp-1": 1, "dp-2": 2, "dp-any": 8, "forced-1": 1, "forced-2": 2}  # variant -> bits a group may move
CLIP_VARIANTS = ("rtn-minmax", "rtn-wls", "rtn-lwc", "lwc-gptq")
TABLE_VARIANTS = ("rtn-table", "table")
TABLE_ROWS, TABLE_ITERS = 128, 10  # rows sampled per other block for the level tables; Lloyd's iterations (converged by 10)
MAX_WIDTH = 8  # codes are bytes in memory; the file's types store b±1 only
LWC_STEPS, LWC_LR, LWC_INIT = 300, 5e-3, 4.0  # Adam steps and rate; σ(4) ≈ 0.98 starts near min-max
NATIVE_VARIANTS = {
    "rtn": {"method": "rtn", "refit": False},
    "gptq": {"method": "gptq", "refit": False},
    "slim": {"method": "slim", "refit": False},
    "slim+refit": {"method": "slim", "refit": True},
    "+act-order": {"method": "slim", "refit": True, "act_order": True},
}
SEED = 0  # calibration windows and SBA's token sample, as bench_frontier's files


class _Collected(Exception):
    """Raised by the last collecting hook to end a forward pass early."""


def _stop(_module, _inputs, _output) -> None:
    raise _Collected


@torch.no_grad()
def capture(
    model_name: str, tensor: str, blocks: list[int], calib: Path, settings: QuantSettings, held_out: Path | None = None
) -> tuple[dict[int, dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Per block: the linear's float weight, its inputs' Hessian and token sample as the
    pipeline collects them (same collector, same seeded sample), and with ``held_out``
    the Hessian of the same number of windows of that text ("H_test"). Also TABLE_ROWS
    seeded rows of the same linear in every other block (what the level tables are fitted on)."""
    path = resolve_model(model_name)
    model, tokenizer = load_model(path), load_tokenizer(path)
    suffixes = TENSOR_CLASSES[tensor]
    every = {b: [m for n, m in block_linears(model, b).items() if n.endswith(suffixes)] for b in range(len(decoder_layers(model)))}
    linears = {b: every[b][0] for b in blocks}
    gen = torch.Generator().manual_seed(SEED)
    others = [found[0].weight.data[torch.randperm(found[0].weight.shape[0], generator=gen)[:TABLE_ROWS]].float()
              for b, found in every.items() if found and b not in linears]  # fmt: skip

    def collect(text: Path) -> dict[int, InputCollector]:
        windows = windows_from_text(text.read_text(encoding="utf-8"), tokenizer, 32, 512, SEED)
        sampling = (windows.numel(), token_sample(windows.numel(), settings.sba_tokens, SEED))
        found = {b: InputCollector(lin, *sampling, torch.device("cpu")) for b, lin in linears.items()}
        handles = [linears[b].register_forward_hook(col) for b, col in found.items()]
        handles.append(linears[max(blocks)].register_forward_hook(_stop))  # the later blocks and the head are not needed
        for start in range(0, windows.shape[0], BATCH):
            try:
                model(windows[start : start + BATCH])
            except _Collected:
                pass
        for h in handles:
            h.remove()
        return found

    cal = collect(calib)
    layers = {b: {"W": linears[b].weight.data.clone(), "H": col.h, "x": torch.cat(col.sample)} for b, col in cal.items()}
    if held_out is not None:
        for b, col in collect(held_out).items():
            layers[b]["H_test"] = col.h
    return layers, others


@dataclass
class Quantized:
    """A variant's dequantized weight, and for the wider widths what they did."""

    approx: torch.Tensor | None  # None where the variant's widths cannot exist
    why_not: str = ""
    moved: int | None = None  # groups away from the average width, of
    groups: int = 0
    spread: float | None = None  # largest group error at the average width over the smallest


def quantize(variant: str, layer: dict[str, torch.Tensor], settings: QuantSettings, tables: dict[int, torch.Tensor]) -> Quantized:
    w, hess, x = layer["W"], layer["H"], layer["x"]
    if variant in CLIP_VARIANTS:
        return Quantized(clipped(variant, layer, settings))
    if variant in TABLE_VARIANTS:
        return Quantized(tabled(variant, layer, settings, tables[settings.bits]))
    if variant not in WIDE_VARIANTS and variant != "sba-slim":
        changed = {"no-refit": {"refit": False}, "no-sba": {"sba": False}, "act-order": {"act_order": True}}.get(variant, {})
        return Quantized(quantize_linear(w, hess, x, replace(settings, **changed))[0].dequantize())
    bits, g = settings.bits, settings.group_size
    h, wd = damped_hessian(hess, w, settings.damp)
    upper = inverse_cholesky_upper(h)
    spread = None
    if variant == "sba-slim":
        widths, _ = search_allocation(wd, upper, x, bits, g)
    elif variant.startswith("dp-"):
        reach = WIDE_VARIANTS[variant]
        widths, spread = widths_by_error(wd, h, bits, g, max(1, bits - reach), min(MAX_WIDTH, bits + reach))
    else:
        step = WIDE_VARIANTS[variant]
        if bits - step < 1:
            return Quantized(None, f"no {bits - step}-bit width")
        if variant.startswith("sba"):
            widths, _ = search_allocation(wd, upper, x, bits, g, torch.diag(h), step=step)
        else:
            order = torch.argsort(group_salience(wd, upper, g), stable=True)
            widths = allocation_for(order, order.numel() // 8, bits, step)
    approx = quantize_linear(w, hess, x, settings, widths)[0].dequantize()
    return Quantized(approx, moved=sum(k != bits for k in widths), groups=len(widths), spread=spread)


def widths_by_error(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, lo: int, hi: int) -> tuple[list[int], float]:
    """Widths in [lo, hi] averaging exactly ``bits`` with the least sum of the groups' own
    errors (each group rounded alone by the least-squares fit, its error under its diagonal
    block of H), by an exact dynamic program over groups and bits spent; and the largest
    group error at ``bits`` over the smallest (how uneven the groups are)."""
    n = w.shape[1] // group_size
    importance = torch.diag(h)
    cost = torch.full((n, hi + 1), math.inf, dtype=torch.float64)
    for j in range(n):
        c = slice(j * group_size, (j + 1) * group_size)
        for k in range(lo, hi + 1):
            fitted = fit_wls(w[:, c], k, importance[c])
            cost[j, k] = float(output_error(w[:, c], fitted.dequantize(fitted.codes(w[:, c])), h[c, c]).sum())
    at_bits = cost[:, bits]
    return cheapest_widths(cost, bits * n), float(at_bits.max() / at_bits.min())


def cheapest_widths(cost: torch.Tensor, total: int) -> list[int]:
    """The widths k_j (``cost`` [groups, widths]: cost[j, k], inf where k is not allowed)
    summing to ``total`` with the least Σ cost[j, k_j]: a dynamic program over groups and bits spent."""
    best = torch.full((total + 1,), math.inf, dtype=torch.float64)
    best[0] = 0
    choice = torch.zeros((cost.shape[0], total + 1), dtype=torch.long)
    for j, row in enumerate(cost.tolist()):
        spent = torch.full_like(best, math.inf)
        for k, value in enumerate(row):
            if k == 0 or math.isinf(value) or k > total:
                continue
            cand = torch.full_like(best, math.inf)
            cand[k:] = best[:-k] + value
            better = cand < spent
            spent[better], choice[j, better] = cand[better], k
        best = spent
    widths, t = [], total
    for j in reversed(range(cost.shape[0])):
        widths.append(int(choice[j, t]))
        t -= widths[-1]
    return widths[::-1]


def clipped(variant: str, layer: dict[str, torch.Tensor], settings: QuantSettings) -> torch.Tensor:
    """Round-to-nearest baselines and learnable weight clipping, uniform widths."""
    bits, g = settings.bits, settings.group_size
    h, w = damped_hessian(layer["H"], layer["W"], settings.damp)
    widths = [bits] * (w.shape[1] // g)
    if variant == "rtn-minmax":
        return rtn_quantize(w, widths, g, lambda wg, k, _: fit_minmax(wg, k)).dequantize()
    if variant == "rtn-wls":
        importance = torch.diag(h)
        return rtn_quantize(w, widths, g, lambda wg, k, c: fit_wls(wg, k, importance[c])).dequantize()
    key = (id(layer), bits, g)  # rtn-lwc and lwc-gptq share one training per layer and width
    if key not in _LWC_TRAINED:
        _LWC_TRAINED[key] = lwc_quantizers(w, layer["H"], bits, g)
    params = _LWC_TRAINED[key]
    if variant == "rtn-lwc":
        return rtn_quantize(w, widths, g, lambda _wg, _k, c: params[c.start // g]).dequantize()
    qt = gptq_quantize(w, inverse_cholesky_upper(h), widths, g, lambda _wg, _k, c: params[c.start // g])
    return refit_scales(w, h, qt).dequantize()


_LWC_TRAINED: dict[tuple[int, int, int], list[GroupParams]] = {}


def lwc_quantizers(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int) -> list[GroupParams]:
    """Per group, the min-max quantizer of the weights clipped to [σ(β)·min, σ(γ)·max], the
    factors per row and group trained by Adam through straight-through rounding to
    minimize the calibration output error tr(ΔW H ΔWᵀ) (SliM-LLM+'s learnable weight clipping)."""
    rows, cols = w.shape
    maxq = (1 << bits) - 1
    wg = w.view(rows, cols // group_size, group_size)
    xmax, xmin = wg.amax(dim=-1).clamp(min=0), wg.amin(dim=-1).clamp(max=0)
    gamma = torch.full_like(xmax, LWC_INIT, requires_grad=True)
    beta = torch.full_like(xmin, LWC_INIT, requires_grad=True)
    opt = torch.optim.Adam([gamma, beta], lr=LWC_LR)
    energy = output_error(w, torch.zeros_like(w), hessian).sum()

    def ste(t: torch.Tensor) -> torch.Tensor:
        return t + (torch.round(t) - t).detach()

    for _ in range(LWC_STEPS):
        top, bottom = torch.sigmoid(gamma) * xmax, torch.sigmoid(beta) * xmin
        d = ((top - bottom) / maxq).clamp_min(1e-10)[..., None]
        z = ste(-bottom[..., None] / d).clamp(0, maxq)
        approx = ((ste(wg / d) + z).clamp(0, maxq) - z) * d
        loss = output_error(w, approx.view(rows, cols), hessian).sum() / energy
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        top, bottom = torch.sigmoid(gamma) * xmax, torch.sigmoid(beta) * xmin
        return [
            fit_minmax(wg[:, j].clamp(bottom[:, j, None], top[:, j, None]), bits) for j in range(cols // group_size)
        ]


class TableParams(GroupParams):
    """A group's quantizer over a level table: w = f32(d)·T[q] + f32(m), T [2^width] increasing."""

    def __init__(self, d: torch.Tensor, m: torch.Tensor, width: int, table: torch.Tensor) -> None:
        self.table = table
        self._mids = (table[1:] + table[:-1]) / 2
        super().__init__(d, m, width)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        m, inv = (self._m, self._inv) if w.dim() == 1 else (self._m[:, None], self._inv[:, None])
        return torch.bucketize((w - m) * inv, self._mids)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        d, m = (self._d, self._m) if q.dim() == 1 else (self._d[:, None], self._m[:, None])
        return self.table[q.long()] * d + m


def fit_table(w: torch.Tensor, table: torch.Tensor, importance: torch.Tensor) -> TableParams:
    """fit_wls over a level table: for each of the same grid of scales around min-max's,
    round to the nearest level, solve min Σ_j a_j (d·T[q_j] + m − w_j)² in closed form;
    keep per row the stored (fp16) candidate with the least weighted error (min-max included)."""
    maxq, width = float(table[-1]), int(table.numel()).bit_length() - 1
    mids = (table[1:] + table[:-1]) / 2
    a = importance.to(w.dtype).clamp_min(0)[None, None, :]
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    steps = torch.arange(-WLS_STEPS // 2, WLS_STEPS // 2 + 1, dtype=w.dtype)
    iscale = (maxq + 0.1 * steps[:, None]) / (xmax - xmin).clamp_min(1e-30)[None, :]  # [steps, rows]
    levels = table[torch.bucketize((w[None] - xmin[None, :, None]) * iscale[:, :, None], mids)]
    d, m = weighted_line(a, levels, w[None])
    d = storable_scale(torch.cat([d, ((xmax - xmin) / maxq)[None]])).float()
    m = torch.cat([m, xmin[None]]).to(torch.float16).float()
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    stored = table[torch.bucketize((w[None] - m[..., None]) * inv[..., None], mids)] * d[..., None] + m[..., None]
    best = (a * (stored - w[None]).pow(2)).sum(dim=2).argmin(dim=0)
    rows = torch.arange(w.shape[0])
    return TableParams(d[best, rows].to(torch.float16), m[best, rows].to(torch.float16), width, table)


def level_table(weights: list[torch.Tensor], width: int, group_size: int, iters: int = TABLE_ITERS) -> torch.Tensor:
    """Lloyd's algorithm for the 2^width levels of a group quantizer: fit every group of
    ``weights`` over the current table (fit_table, equal importance), move each level to
    the mean of the normalized weights (w − m)/d it took, rescale to span 0 … 2^width − 1
    (d and m absorb any affine map); start from the uniform levels."""
    maxq = (1 << width) - 1
    table = torch.arange(maxq + 1, dtype=torch.float32)
    ones = torch.ones(group_size)
    for _ in range(iters):
        sums, counts = torch.zeros(maxq + 1, dtype=torch.float64), torch.zeros(maxq + 1, dtype=torch.float64)
        for w in weights:
            groups = w.reshape(-1, group_size)
            for r in range(0, groups.shape[0], 4096):
                part = groups[r : r + 4096]
                p = fit_table(part, table, ones)
                live = p.d.float() > 0
                t = ((part - p.m.float()[:, None]) / p.d.float().clamp_min(1e-30)[:, None])[live]
                q = torch.bucketize(t, (table[1:] + table[:-1]) / 2).flatten()
                sums.index_add_(0, q, t.flatten().double())
                counts.index_add_(0, q, torch.ones_like(q, dtype=torch.float64))
        means = (sums / counts.clamp_min(1)).float()
        table = (means - means[0]) / (means[-1] - means[0]) * maxq
    return table


def tabled(variant: str, layer: dict[str, torch.Tensor], settings: QuantSettings, table: torch.Tensor) -> torch.Tensor:
    """Uniform widths over a level table: round to nearest, or GPTQ then the refit (which
    solves each row's (d, m) for the stored levels T[q] as it does for the codes q)."""
    bits, g = settings.bits, settings.group_size
    h, w = damped_hessian(layer["H"], layer["W"], settings.damp)
    importance = torch.diag(h)
    widths = [bits] * (w.shape[1] // g)

    def fit(wg: torch.Tensor, _k: int, c: slice) -> TableParams:
        return fit_table(wg, table, importance[c])

    if variant == "rtn-table":
        qt = rtn_quantize(w, widths, g, fit)
        return replace(qt, codes=table[qt.codes.long()]).dequantize()  # levels in place of codes: d·T[q] + m
    qt = gptq_quantize(w, inverse_cholesky_upper(h), widths, g, fit)
    return refit_scales(w, h, replace(qt, codes=table[qt.codes.long()])).dequantize()


def relative_error(layer: dict[str, torch.Tensor], approx: torch.Tensor, hessian: str = "H") -> float:
    energy = output_error(layer["W"], torch.zeros_like(layer["W"]), layer[hessian]).sum()
    return float(output_error(layer["W"], approx, layer[hessian]).sum() / energy)


def mean_errors(layers: dict[int, dict[str, torch.Tensor]], approx: dict[int, torch.Tensor], digits: int = 5) -> str:
    """Mean relative error over the blocks: "calibration / held-out" (calibration alone without held-out inputs)."""
    keys = ["H", "H_test"] if all("H_test" in layer for layer in layers.values()) else ["H"]
    means = [sum(relative_error(layers[b], approx[b], key) for b in layers) / len(layers) for key in keys]
    return " / ".join(f"{m:.{digits}f}" for m in means)


def cell(layers: dict[int, dict[str, torch.Tensor]], variant: str, settings: QuantSettings, tables: dict[int, torch.Tensor]) -> str:
    """One table cell: the variant's mean errors; for the wider widths, the groups moved in
    all blocks and the range of the blocks' spreads."""
    made = {b: quantize(variant, layer, settings, tables) for b, layer in layers.items()}
    missing = next((q.why_not for q in made.values() if q.approx is None), None)
    if missing is not None:
        return f"n/a ({missing})"
    text = mean_errors(layers, {b: q.approx for b, q in made.items()})
    if all(q.moved is None for q in made.values()):
        return text
    notes = [f"{sum(q.moved for q in made.values())}/{sum(q.groups for q in made.values())} moved"]
    spreads = [q.spread for q in made.values() if q.spread is not None]
    if spreads:
        notes.append(f"spread {min(spreads):.1f}-{max(spreads):.1f}×")
    return f"{text} ({', '.join(notes)})"


def native_table(layers: dict[int, dict[str, torch.Tensor]], types: list[str], variants: list[str], damps: list[float]) -> None:
    """Mean relative output error of each stock type under each native variant, a row per damping."""
    print("| type | damp | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for name in types:
        for damp in damps:
            row = []
            for variant in (NATIVE_VARIANTS[v] for v in variants):
                if variant.get("act_order") and native_type(name).span > 1:
                    row.append("n/a")  # the lattice types round runs of columns in order
                    continue
                settings = QuantSettings(native=name, damp=damp, **variant)
                row.append(mean_errors(layers, {b: quantize_linear(layer["W"], layer["H"], None, settings)[0].dequantize() for b, layer in layers.items()}))
            print(f"| {name} | {damp:g} | " + " | ".join(row) + " |", flush=True)


def llama_table(layers: dict[int, dict[str, torch.Tensor]], model: str, tensor: str, types: list[str]) -> None:
    """Mean relative output error of llama-quantize's tensors (imatrix from 32 × 512 tokens of
    WikiText-2 valid), dequantized by gguf-py from bench_frontier's cached files."""
    import gguf
    import numpy as np

    from slim2gguf.named_models import find
    from slim2gguf.paths import cache_dir

    work = cache_dir() / "frontier" / (find(model).name if find(model) else Path(model).name)
    print("| llama.cpp type | relative output error |")
    print("|---|---|")
    for name in types:
        path = work / f"{name}-{tensor}-imatrix-valid-32x512.gguf"
        if not path.is_file():
            sys.exit(f"no {path}: run bench_frontier.py --model {model} --tensors {tensor} --types {name} first")
        stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
        approx = {}
        for block, layer in layers.items():
            t = stored[f"blk.{block}.{tensor}.weight"]
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
            approx[block] = torch.from_numpy(values).reshape(layer["W"].shape)
        print(f"| {name} | {mean_errors(layers, approx, digits=6)} |", flush=True)  # llama-quantize's K-quants reach 0.0002


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tensor", default="ffn_down", choices=sorted(TENSOR_CLASSES))
    parser.add_argument("--blocks", default="1,8,16,24")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--variants", help=f"SliM variants (default: {','.join(VARIANTS)}; also {','.join((*WIDE_VARIANTS, *CLIP_VARIANTS, *TABLE_VARIANTS))}); with --native, native variants (default: {','.join(NATIVE_VARIANTS)})")
    parser.add_argument("--native", help="comma-separated stock types to measure instead of SliM variants")
    parser.add_argument("--llama-types", help="comma-separated llama.cpp types whose bench_frontier tensor-level files to measure too")
    parser.add_argument("--calib", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt")
    parser.add_argument("--held-out", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw",
                        help="text whose inputs measure the error out of sample (skipped when absent)")  # fmt: skip
    parser.add_argument("--damp", default=f"{QuantSettings.damp:g}", help="GPTQ's damping (fraction of mean diag H); several, comma-separated, give a row each")
    args = parser.parse_args()
    known = tuple(NATIVE_VARIANTS) if args.native else (*VARIANTS, *WIDE_VARIANTS, *CLIP_VARIANTS, *TABLE_VARIANTS)
    variants = args.variants.split(",") if args.variants else list(NATIVE_VARIANTS if args.native else VARIANTS)
    unknown = set(variants) - set(known)
    if unknown:
        sys.exit(f"unknown variant {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    try:
        damps = [float(d) for d in args.damp.split(",")]
    except ValueError:
        sys.exit(f"--damp takes numbers, comma-separated, not {args.damp!r}")
    try:  # QuantSettings holds the rules for the group size and the damping
        settings = [QuantSettings("slim", 3, args.group_size, damp=damp) for damp in damps]
    except ValueError as err:
        sys.exit(str(err))
    if not args.calib.is_file():
        sys.exit(f"no calibration text at {args.calib}")
    torch.set_num_threads(1)
    held_out = args.held_out if args.held_out.is_file() else None
    layers, others = capture(args.model, args.tensor, [int(b) for b in args.blocks.split(",")], args.calib, settings[0], held_out)
    print(f"{args.model} {args.tensor}, blocks {args.blocks}: mean relative output error, "
          + ("calibration / held-out" if held_out else "calibration inputs"))  # fmt: skip
    if args.native:
        native_table(layers, args.native.split(","), variants, damps)
    if args.llama_types:
        llama_table(layers, args.model, args.tensor, args.llama_types.split(","))
    if args.native or args.llama_types:
        return
    print(f"SliM g{args.group_size}")
    bits_list = [int(b) for b in args.bits.split(",")]
    tables = {}
    if set(variants) & set(TABLE_VARIANTS):
        for bits in bits_list:
            tables[bits] = level_table(others, bits, args.group_size)
            print(f"{bits}-bit levels: " + " ".join(f"{v:.3f}" for v in tables[bits].tolist()), flush=True)
    print("| bits | damp | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for bits in bits_list:
        for damp in damps:
            settings = QuantSettings("slim", bits, args.group_size, damp=damp)
            row = [cell(layers, variant, settings, tables) for variant in variants]
            print(f"| {bits} | {damp:g} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
