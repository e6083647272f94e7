"""How much each tensor's quantization at each candidate setting costs, for the budget.

Two estimators, compared by measurement in docs/BENCHMARKS.md:

* ``fisher``: the increase of the calibration loss, ½ Σ F ⊙ ΔW², with F the diagonal
  empirical Fisher (squared per-window gradients of the next-token loss). One unit
  for every tensor, so a tensor near the output and one at the input compare fairly.
* ``hessian``: each tensor's relative output error on the calibration inputs,
  Σ_j h_j ΔW_ij² / Σ_j h_j W_ij² with h = diag(XᵀX) (the importance matrix llama.cpp
  uses), forward passes only; every tensor's relative error counts the same.

ΔW is round-to-nearest at the candidate (min-max per group for SliM settings, the
evenly weighted fit of slim2gguf.storage for a linear's stock type and for the
embedding's and output's K-quants, gguf-py's quantizer for their legacy types: as the
exporter stores them): cheap, and
ordered like the calibrated quantizer's errors. Among stock types (``--format native``)
a decoder linear is scored on at most ``SAMPLE_ROWS`` of its rows: every type rounds rows
independently, so a sum over rows can be estimated from some of them, and that keeps the
lattice types' grid searches (minutes per large tensor, hours per 1.5B model) from
dominating the pass. The ``KEEP_ROWS`` rows with the most at stake (Σ_j F_ij W_ij², or
Σ_j h_j W_ij²: outlier channels) count exactly; evenly spaced rows of the others stand
for all of them.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from torch import nn

from . import format as fmt
from .budget import EMBED, LEGACY_EMBED_TYPES, OUTPUT, ModelShapes, parse_label
from .progress import Progress
from .quantizer import fit_minmax
from .storage import NATIVE_TYPES

SENSITIVITIES = ("fisher", "hessian")
WINDOWS = 16  # calibration windows the estimators read: enough to rank tensors, a minute on the demo model
_ROWS_PER_CHUNK = 4096
SAMPLE_ROWS = 256  # of a 1.5B model's 1536- and 8960-row linears: a tenth of the rounding (BENCHMARKS.md)
KEEP_ROWS = 32


def estimator_windows(windows: torch.Tensor) -> torch.Tensor:
    """The calibration windows the estimators read: the first ``WINDOWS``."""
    return windows[:WINDOWS]


def sampled_rows(at_stake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows of a linear to score and what each stands for: the ``KEEP_ROWS`` with the most
    ``at_stake`` (one value per row) for themselves, then evenly spaced rows among the rest
    for all of the rest; None when the linear has no more than ``SAMPLE_ROWS`` rows."""
    rows = at_stake.numel()
    if rows <= SAMPLE_ROWS:
        return None
    order = torch.argsort(at_stake.cpu(), descending=True, stable=True)
    kept, rest = order[:KEEP_ROWS], order[KEEP_ROWS:].sort().values
    spread = rest[torch.linspace(0, len(rest) - 1, SAMPLE_ROWS - KEEP_ROWS).round().long()]
    counts = torch.cat([torch.ones(KEEP_ROWS), torch.full((len(spread),), len(rest) / len(spread))])
    return torch.cat([kept, spread]), counts


def slim_error(weight: torch.Tensor, stype: fmt.SlimType) -> torch.Tensor:
    """ΔW of min-max round-to-nearest at ``stype`` (every group at its average width)."""
    rows, cols = weight.shape
    w = weight.float().reshape(-1, stype.group_size)
    params = fit_minmax(w, stype.bits)
    return (params.dequantize(params.codes(w)) - w).view(rows, cols)


def native_error(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    """ΔW of rounding to nearest in a stock type, each block fitted evenly (storage.NativeType.fit)."""
    stype = NATIVE_TYPES[type_name]
    size = stype.block_size
    out = torch.empty(weight.shape, dtype=torch.float32)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        w = weight[start : start + _ROWS_PER_CHUNK].detach().float()
        blocks = w.reshape(-1, size)
        _, values = stype.fit(blocks, torch.ones(size, device=w.device)).round_all(blocks)
        out[start : start + _ROWS_PER_CHUNK] = (values.view(w.shape) - w).cpu()
    return out


def stock_error(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    """ΔW of gguf-py's quantizer for a stock type, as the converter stores the tensor."""
    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    out = torch.empty(weight.shape, dtype=torch.float32)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        w = weight[start : start + _ROWS_PER_CHUNK].detach().float().cpu().numpy()
        back = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        out[start : start + _ROWS_PER_CHUNK] = torch.from_numpy(np.asarray(back, dtype=np.float32) - w)
    return out


def _targets(model: nn.Module, shapes: ModelShapes) -> dict[str, nn.Parameter]:
    modules = dict(model.named_modules())
    found = {name: modules[name].weight for name in shapes.linears}
    found[EMBED] = model.get_input_embeddings().weight
    if shapes.output is not None:
        found[OUTPUT] = model.get_output_embeddings().weight
    return found


def fisher_weights(model: nn.Module, windows: torch.Tensor, shapes: ModelShapes, device: torch.device, progress: Progress) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of every budgeted tensor (mean over windows of the squared
    gradient of the window's mean next-token loss)."""
    targets = _targets(model, shapes)
    fisher = {name: torch.zeros_like(p, device="cpu") for name, p in targets.items()}
    saved = {p: p.requires_grad for p in model.parameters()}
    handles = []
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in targets.items():
        p.requires_grad_(True)

        def accumulate(param: torch.Tensor, name: str = name) -> None:
            grad = param.grad.cpu()
            fisher[name].addcmul_(grad, grad)
            param.grad = None

        handles.append(p.register_post_accumulate_grad_hook(accumulate))
    model.to(device)
    task = progress.add_task("sensitivity: Fisher over calibration windows", total=len(windows))
    try:
        with torch.enable_grad():
            for window in windows:
                ids = window[None].to(device)
                model(ids, labels=ids, use_cache=False).loss.backward()
                progress.advance(task)
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.to("cpu")
    for f in fisher.values():
        f /= len(windows)
    return fisher


@torch.no_grad()
def input_energy(model: nn.Module, windows: torch.Tensor, shapes: ModelShapes, device: torch.device, progress: Progress) -> dict[str, torch.Tensor]:
    """h = Σ x² per input column of every budgeted linear and of the LM head, and token
    counts per embedding row (the embedding's "input energy")."""
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    watched = {name: modules[name] for name in shapes.linears} | {OUTPUT: head}
    energy = {name: torch.zeros(mod.in_features) for name, mod in watched.items()}

    def hook(name: str):
        def record(_mod, inputs, _out) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            energy[name] += x.pow(2).sum(dim=0).cpu()

        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in watched.items()]
    model.to(device)
    task = progress.add_task("sensitivity: input energy over calibration windows", total=len(windows))
    try:
        for window in windows:
            model(window[None].to(device), use_cache=False)
            progress.advance(task)
    finally:
        for h in handles:
            h.remove()
        model.to("cpu")
    vocab = model.get_input_embeddings().weight.shape[0]
    energy[EMBED] = torch.bincount(windows.flatten(), minlength=vocab).float()
    return energy


def _relative(delta: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, by_row: bool, counts: torch.Tensor | None = None) -> float:
    """Σ h ΔW² / Σ h W², with h over columns, or over rows (``by_row``: the embedding);
    ``counts``: the rows each sampled row stands for."""
    h = h[:, None] if by_row else h[None, :]
    if counts is not None:
        h = h * counts[:, None]
    return float((h * delta.pow(2)).sum() / (h * weight.float().pow(2)).sum().clamp_min(1e-30))


def measure(
    model: nn.Module, windows: torch.Tensor, shapes: ModelShapes, method: str, device: torch.device, console: Console
) -> dict[str, dict[str, float]]:
    """Score of every budgeted tensor at every candidate: tensor -> {choice: score}."""
    if method not in SENSITIVITIES:
        raise ValueError(f"--sensitivity must be one of {', '.join(SENSITIVITIES)}, got {method!r}")
    windows = estimator_windows(windows)
    targets = _targets(model, shapes)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    scores: dict[str, dict[str, float]] = {}
    with Progress(*columns, console=console) as progress:
        if method == "fisher":
            weights = fisher_weights(model, windows, shapes, device, progress)
        else:
            weights = input_energy(model, windows, shapes, device, progress)
        task = progress.add_task("sensitivity: candidates per tensor", total=len(targets))
        for name, choices in shapes.candidates().items():
            w, weight, counts = targets[name].detach(), weights[name], None
            if shapes.native and name not in (EMBED, OUTPUT):
                w2 = w.float().pow(2)
                picked = sampled_rows((weight * w2).sum(1) if method == "fisher" else w2 @ weight)
                if picked is not None:  # the Fisher diagonal is per weight, the input energy per column
                    rows, counts = picked
                    w, weight = w[rows], (weight[rows] if method == "fisher" else weight)
            scores[name] = {}
            if method == "fisher" and name in (EMBED, OUTPUT):
                seen = weight.ne(0).any(1)  # rows of tokens the windows never touch cost nothing: skipped, exactly
                if not bool(seen.all()):
                    w, weight = w[seen], weight[seen]
            for label, _bits in choices:
                if name in (EMBED, OUTPUT) and label in LEGACY_EMBED_TYPES:  # written by gguf-py
                    delta = stock_error(w, label)
                elif label in NATIVE_TYPES:
                    delta = native_error(w.to(device), label)
                else:
                    delta = slim_error(w.to(device), parse_label(label)).cpu()
                if method == "fisher":
                    err = weight * delta.pow(2)
                    scores[name][label] = 0.5 * float((err if counts is None else counts[:, None] * err).sum())
                elif name == EMBED:
                    score = _relative(delta, w, weights[EMBED], by_row=True)
                    if shapes.output is None:  # tied: the same rows are the LM head too
                        score += _relative(delta, w, weights[OUTPUT], by_row=False)
                    scores[name][label] = score
                else:
                    scores[name][label] = _relative(delta, w, weight, by_row=False, counts=counts)
            progress.advance(task)
    return scores
