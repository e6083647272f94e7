"""Sequential block-by-block quantization (GPTQ's schedule).

Capture the inputs of decoder block i on the calibration set, accumulate each linear's
Hessian while running the float block, quantize its linears, then run the *quantized*
block to produce block i+1's inputs. Only the current block and one batch of
activations live on the compute device.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from . import __version__, moe, score_cache, sensitivity
from .architectures import in_classes, tensor_class
from .budget import Decision, ModelShapes, check_budget, model_shapes, solve
from .calib import BUILTIN, calibration_windows, check_window_counts, json_problem, read_text
from .checkpoint import CheckpointWriter, finished_with, is_decision
from .devices import pick_device
from .errors import reason
from .format import GROUP_SIZES
from .methods import NATIVE_BY_BUDGET, QuantSettings, check_allocation, quantize_linear
from .models import (
    ModelError,
    architecture_of,
    block_linear_shapes,
    block_linears,
    block_name,
    check_context,
    context_length,
    decoder_layers,
    load_model,
    load_tokenizer,
    resolve_model,
)
from .paths import model_fingerprint, short_digest
from .progress import Progress
from .qtensor import StoredTensor
from .storage import NATIVE_TYPES, type_for
from .text_model import BlockLoader, TextModelError, trim_heap

BATCH = 8


class StopCapture(Exception):
    """Raised by the hook that records block 0's inputs."""


@dataclass(frozen=True)
class CalibSettings:
    source: str = "self"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        check_window_counts(self.nsamples, self.seqlen)


@dataclass
class QuantizeReport:
    path: Path
    wall_s: float
    peak_rss_mib: float
    peak_device_mib: float | None
    width_groups: Counter = field(default_factory=Counter)
    tensor_types: Counter = field(default_factory=Counter)  # tensors per stored type (SliM or stock)
    resumed_from: int = 0
    decision: Decision | None = None  # a --bpw run's per-tensor choices


@dataclass
class Allocation:
    """Saved widths to reuse (``--allocation``): per tensor, with the group size where
    the source records it, and a --bpw run's decision (which also fixes the token
    embedding's and output's types). A stock-type --bpw run's decision has no widths:
    it is reused whole, each tensor's stock type as chosen."""

    widths: dict[str, list[int]]
    group_sizes: dict[str, int] = field(default_factory=dict)
    budget: dict[str, Any] | None = None

    @property
    def stock_types(self) -> bool:
        """Whether this is a --format native --bpw decision (every choice a stock type)."""
        return self.budget is not None and not self.widths and all(c in NATIVE_TYPES for c in self.budget["choices"].values())

    def fingerprint(self) -> str:
        """A digest of every choice, kept in the checkpoint's settings: a rerun with another
        allocation file (or the same file rewritten) must not reuse this one's checkpoint."""
        return short_digest(json.dumps(asdict(self), sort_keys=True))


def check_selection(shapes: dict[str, tuple[int, int]], classes: tuple[str, ...]) -> None:
    """Every class ``--tensors`` names is one of the model's: a class it lacks quantized
    nothing of it (none at all, a file with no quantized tensor, refused only at export)."""
    present = sorted({c for c in map(tensor_class, shapes) if c is not None})
    lacking = [c for c in classes if c not in present]
    if lacking:
        raise ValueError(f"--tensors {','.join(lacking)}: this model has no such linears; its classes are {', '.join(present)}")


def quantized_linears(model: nn.Module, index: int, quant: QuantSettings) -> dict[str, nn.Linear]:
    """The linears of block ``index`` that ``quant`` quantizes (its ``tensors`` selection);
    the others stay float, in calibration too."""
    return {n: lin for n, lin in block_linears(model, index).items() if in_classes(n, quant.tensors)}


def check_shapes(shapes: dict[str, tuple[int, int]], quant: QuantSettings) -> None:
    """Every quantized linear's input size must be a multiple of the group size, or of the
    stock type's (or its fallback's) blocks (checked on the config's shapes, before any
    weight loads)."""
    if quant.native is not None:
        for name, (_, cols) in shapes.items():
            if in_classes(name, quant.tensors):
                try:
                    type_for(quant.native, cols)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
        return
    group_size = quant.group_size
    bad = {name: cols for name, (_, cols) in shapes.items() if in_classes(name, quant.tensors) and cols % group_size}
    if not bad:
        return
    sizes = sorted(set(bad.values()))
    fits = [g for g in (128, 64, 32) if all(s % g == 0 for s in sizes)]
    hint = (
        f"use --group-size {fits[0]}" if fits else "no supported group size (32, 64, 128) divides it; "
        "slim2gguf cannot quantize this model"
    )
    name, size = next(iter(bad.items()))
    raise ValueError(f"{name} has {size} input columns, not a multiple of --group-size {group_size}: {hint}")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


def layer_types(model: nn.Module) -> list[str]:
    """Each decoder layer's kind, as the model's forward tells them apart (Gemma alternates
    sliding-window and global layers, with their own masks and rotary embeddings); one kind
    where the config names none."""
    n = len(decoder_layers(model))
    types = getattr(model.config, "layer_types", None)
    return list(types[:n]) if types else ["full_attention"] * n


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device
) -> tuple[list[torch.Tensor], dict[str, list[dict]]]:
    """Per batch, the hidden states at the input of block 0 and the keyword arguments (mask,
    rotary embeddings) that each kind of layer gets, read at the first layer of that kind;
    kept on the CPU. The float model runs only as far as the last of those layers."""
    layers = decoder_layers(model)
    types = layer_types(model)
    first_of = {kind: types.index(kind) for kind in dict.fromkeys(types)}
    last = max(first_of.values())
    hidden: list[torch.Tensor] = []
    kwargs_of: dict[str, list[dict]] = {kind: [] for kind in first_of}

    def hook_for(kind: str, index: int) -> Callable:
        def hook(_module, args, kwargs):
            if index == 0:
                hidden.append((args[0] if args else kwargs["hidden_states"]).cpu())
            skip = ("hidden_states", "past_key_values", "past_key_value")
            kwargs_of[kind].append({k: _to(v, torch.device("cpu")) for k, v in kwargs.items() if k not in skip})
            if index == last:
                raise StopCapture

        return hook

    outer = [model.model.embed_tokens, model.model.rotary_emb, *layers[:last]]
    for mod in outer:
        mod.to(device)
    handles = [layers[i].register_forward_pre_hook(hook_for(kind, i), with_kwargs=True) for kind, i in first_of.items()]
    try:
        for start in range(0, windows.shape[0], BATCH):
            with contextlib.suppress(StopCapture):
                model(windows[start : start + BATCH].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for mod in outer:
            mod.to("cpu")
    return hidden, kwargs_of


def _run_block(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]], device: torch.device) -> list[torch.Tensor]:
    outs = []
    for hidden, kwargs in batches:
        out = layer(hidden.to(device), **{k: _to(v, device) for k, v in kwargs.items()})
        out = out[0] if isinstance(out, tuple) else out
        outs.append(out.cpu())
    return outs


def token_sample(n_tokens: int, count: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``count`` calibration tokens (seeded): the inputs SBA scores on."""
    order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))
    return order[:count].sort().values


class InputCollector:
    """Forward hook accumulating H = 2/N Σ xxᵀ and a fixed token sample of the inputs."""

    def __init__(self, lin: nn.Linear, n_tokens: int, sample_idx: torch.Tensor, device: torch.device):
        self.h = torch.zeros(lin.in_features, lin.in_features, device=device)
        self.scale = 2.0 / n_tokens
        self.sample_idx = sample_idx
        self.seen = 0
        self.sample: list[torch.Tensor] = []

    def __call__(self, _module, inputs, _output) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        self.h.addmm_(x.T, x, alpha=self.scale)
        idx = self.sample_idx[(self.sample_idx >= self.seen) & (self.sample_idx < self.seen + x.shape[0])]
        self.sample.append(x[idx - self.seen].cpu())
        self.seen += x.shape[0]

    def top_up(self, every: InputCollector, tokens: int) -> None:
        """Add ``tokens - seen`` tokens' worth of ``every``'s average curvature, and its
        sample (moe.top_up: an expert that few calibration tokens reach)."""
        self.h.add_(every.h, alpha=(tokens - self.seen) / every.seen)
        self.sample.extend(every.sample)


def _widths_summary(widths: Counter) -> str:
    return " ".join(f"{k}b:{widths[k]}" for k in sorted(widths))


def _types(tensors: list[StoredTensor]) -> Counter:
    return Counter(qt.stype.name for qt in tensors)


def _open_model(path: Path, whole: bool) -> tuple[nn.Module, BlockLoader | None]:
    """The float model. ``whole`` (self-generated calibration runs it end to end, as does
    a model without safetensors files): loaded at once. Otherwise
    a skeleton whose token embedding is read now and whose blocks the caller reads and
    frees one at a time (text_model.BlockLoader), so host memory stays flat in depth."""
    if whole or not any(path.glob("*.safetensors")):
        return load_model(path), None
    try:
        loader = BlockLoader(path)
        loader.load("model.embed_tokens")
        loader.check_unread(("model.embed_tokens", "model.layers"))  # blocks are checked as they are read
    except TextModelError as err:
        raise ModelError(str(err)) from err
    return loader.skeleton, loader


def allocated(name: str, in_features: int, quant: QuantSettings, allocation: Allocation) -> QuantSettings:
    """The settings ``allocation`` gives one linear: the group size it records (else
    ``quant``'s) and the bits its widths average, checked against the weight's groups."""
    widths = allocation.widths.get(name)
    if widths is None:
        raise ValueError(f"--allocation has no widths for {name}")
    group = allocation.group_sizes.get(name, quant.group_size)
    if in_features % group:
        raise ValueError(f"--allocation gives {name} group size {group}, which does not divide {in_features}")
    made_at = in_features // len(widths) if in_features % len(widths) == 0 else None
    if name not in allocation.group_sizes and made_at != group and made_at in GROUP_SIZES:
        raise ValueError(f"--allocation gives {name} {len(widths)} groups, {in_features // group} at group size {group}: add --group-size {made_at}")
    return replace(quant, bits=check_allocation(widths, in_features // group, name), group_size=group)


def tensor_settings(
    name: str, lin: nn.Linear, quant: QuantSettings, allocation: Allocation | None, decision: Decision | None
) -> tuple[QuantSettings, list[int] | None]:
    """The settings one linear is quantized with, and the widths it reuses (if any)."""
    if allocation is not None:
        return allocated(name, lin.in_features, quant, allocation), allocation.widths[name]
    if decision is not None:
        if name not in decision.choices:
            raise ValueError(f"the checkpoint's --bpw decision has no setting for {name}")
        setting = decision.setting(name)
        if isinstance(setting, str):
            return replace(quant, native=setting, bpw=None), None
        return replace(quant, bits=setting.bits, group_size=setting.group_size), None
    return quant, None


def _quantize_block(
    index: int,
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    batches: list[tuple[torch.Tensor, dict]],
    quant: QuantSettings,
    plan: tuple[Allocation | None, Decision | None],
    sampling: tuple[int, torch.Tensor],
    dev: torch.device,
) -> tuple[dict[str, StoredTensor], dict[str, Any], list[torch.Tensor], float | None]:
    """Quantize block ``index``'s linears in place; return them, what to record of the
    block (the SBA search's summary per linear: chosen candidate i, its KL, the uniform
    allocation's KL; the routed token count of each expert linear topped up), the
    quantized block's outputs (next block's inputs) and its relative output error (None
    without calibration)."""
    collectors: dict[str, InputCollector] = {}
    info: dict[str, Any] = {}
    if batches:
        collectors = {n: InputCollector(lin, *sampling, dev) for n, lin in linears.items()}
        handles = [lin.register_forward_hook(collectors[n]) for n, lin in linears.items()]
        with moe.ExpertInputs(layer, block_name(index)) as recorded:
            reference = _run_block(layer, batches, dev)
        for h in handles:
            h.remove()
        topped = moe.top_up(recorded, collectors, lambda lin: InputCollector(lin, *sampling, dev))
        del recorded
        if topped:
            info["experts_topped_up"] = topped
    tensors, searches = {}, {}
    for name, lin in linears.items():
        settings, given = tensor_settings(name, lin, quant, *plan)
        col = collectors.get(name)
        hessian, sample = (col.h, torch.cat(col.sample).to(dev)) if col else (None, None)
        qt, search = quantize_linear(lin.weight.data.to(dev), hessian, sample, settings, given)
        lin.weight.data = qt.dequantize().to(dev, lin.weight.dtype)
        tensors[name] = qt
        if search:
            searches[name] = search
    if searches:
        info["sba_search"] = searches
    if not batches:
        return tensors, info, [], None
    outputs = _run_block(layer, batches, dev)
    num = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return tensors, info, outputs, num / max(den, 1e-30)


def _sensitivity_scores(
    path: Path,
    model: nn.Module,
    loader: BlockLoader | None,
    windows: torch.Tensor,
    shapes: ModelShapes,
    method: str,
    dev: torch.device,
    console: Console,
) -> dict[str, dict[str, float]]:
    """A --bpw run's scores: those an earlier run saved for the same model, calibration,
    estimator and code (score_cache), else measured on the whole float model: ``model``
    itself, or, beside a block-by-block ``loader``, a whole copy loaded for the
    measurement and freed after it (the skeleton's token embedding is dropped meanwhile,
    so two float32 copies of it never sit side by side)."""
    key = score_cache.score_key(path, windows, method, shapes, dev)
    scores = score_cache.load_scores(key)
    if scores is not None:
        console.print(f"sensitivity: reusing the scores in {score_cache.path_of(key)} (same model, calibration, estimator and code)")
        return scores
    if loader is None:
        scores = sensitivity.measure(model, windows, shapes, method, dev, console)
    else:
        for module in ("model.embed_tokens", "lm_head"):  # lm_head: the embedding again, where tied
            loader.release(module)
        whole = load_model(path)
        scores = sensitivity.measure(whole, windows, shapes, method, dev, console)
        del whole
        gc.collect()
        trim_heap()
        loader.load("model.embed_tokens")
    if not score_cache.save_scores(key, scores):
        console.print(f"sensitivity: could not save the scores in {score_cache.path_of(key)}; a later budget measures again")
    return scores


def load_allocation(path: str | os.PathLike) -> Allocation:
    """Widths per tensor from a checkpoint manifest (with its group sizes and --bpw
    decision), a stock-type --bpw run's decision, or a plain {name: [widths]} JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as err:
        raise ValueError(f"--allocation {path} cannot be read: {reason(err)}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"--allocation {path} is not UTF-8 text (byte {err.start} is not), as JSON must be") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, a number past the digit limit, deep nesting
        raise ValueError(f"--allocation {path} cannot be read as JSON: {json_problem(err)}") from None

    def widths_ok(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(type(w) is int and 1 <= w <= 5 for w in value)

    wrong = ValueError(f"--allocation {path} is neither a checkpoint manifest nor a {{name: [widths 1-5]}} JSON")
    if not isinstance(data, dict):
        raise wrong
    if "tensors" in data:
        tensors, budget = data["tensors"], data.get("budget")
        if not isinstance(tensors, dict) or not all(isinstance(m, dict) for m in tensors.values()):
            raise wrong
        if budget is not None and not is_decision(budget):
            raise wrong
        if tensors and not any("widths" in m for m in tensors.values()):
            stock = Allocation({}, budget=budget)
            if not stock.stock_types:
                raise ValueError(f"--allocation {path} gives every tensor one stock type, chosen by no --bpw budget: nothing to reuse")
            return stock
        if not all(widths_ok(m.get("widths")) for m in tensors.values()):
            raise wrong
        groups = {name: meta["group_size"] for name, meta in tensors.items() if "group_size" in meta}
        if not all(g in (32, 64, 128) for g in groups.values()):
            raise wrong
        return Allocation({name: meta["widths"] for name, meta in tensors.items()}, groups, budget)
    if not all(widths_ok(v) for v in data.values()):
        raise wrong
    return Allocation(data)


def _bar_columns() -> list[Any]:
    """What a bar of quantize shows: its step, done of total, time taken and time left."""
    return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]


def _calibration(calib: CalibSettings, model: nn.Module, tokenizer: Any, text: str | None, console: Console) -> torch.Tensor:
    """The calibration windows, with a bar while ``self`` samples them from the model."""
    if calib.source != "self":
        return calibration_windows(calib.source, model, tokenizer, calib.nsamples, calib.seqlen, calib.seed, text)
    with Progress(*_bar_columns(), console=console) as progress:
        task = progress.add_task("calibration: sampling tokens from the model", total=calib.nsamples * (calib.seqlen - 1))
        return calibration_windows(
            calib.source, model, tokenizer, calib.nsamples, calib.seqlen, calib.seed, on_tokens=lambda n: progress.advance(task, n)
        )


def quantize_model(
    model_name: str,
    out_dir: str | os.PathLike,
    quant: QuantSettings,
    calib: CalibSettings,
    device: str = "auto",
    allocation: Allocation | None = None,
    console: Console | None = None,
) -> QuantizeReport:
    """Quantize every decoder-block linear of ``model_name`` into a checkpoint at ``out_dir``.

    With ``quant.bpw`` each linear's setting (and the token embedding's and output's
    stock types) come from a budget spent by measured sensitivity, decided once before
    the first block and kept in the manifest, so a resumed run keeps it."""
    console = console or Console(stderr=True, markup=False)
    started = time.perf_counter()
    dev = pick_device(device)
    path = resolve_model(model_name, quantizing=True)
    arch = architecture_of(path)
    stock = allocation is not None and allocation.stock_types
    if allocation is not None and quant.method != "slim":
        raise ValueError("--allocation reuses a SliM run's choices: it applies to --method slim only")
    if stock and quant.native != NATIVE_BY_BUDGET:
        raise ValueError("--allocation gives each tensor a stock type (a --format native --bpw run): add --format native, no --type")
    if allocation is not None and not stock and quant.native is not None:
        raise ValueError("--allocation gives SliM widths: drop --format native")
    if quant.native == NATIVE_BY_BUDGET and quant.bpw is None and not stock:
        raise ValueError("stock types chosen per tensor need --bpw, or the --allocation of a --format native --bpw run")
    linear_shapes = block_linear_shapes(path)  # a weightless instance of the model: built once for every check below
    if quant.tensors is not None:
        check_selection(linear_shapes, quant.tensors)
    if allocation is not None:
        chosen = allocation.budget["choices"] if stock else allocation.widths
        missing = sorted(n for n in linear_shapes if in_classes(n, quant.tensors) and n not in chosen)
        if missing:
            raise ValueError(f"--allocation has no {'stock type' if stock else 'widths'} for {missing[0]} ({len(missing)} linears missing)")
        if not stock:  # every tensor's widths against its groups, before the first block's work
            foreign = sorted(set(allocation.widths) - set(linear_shapes))
            if foreign:  # another model's allocation, its other tensors left out without a word
                raise ValueError(f"--allocation gives widths to {foreign[0]}, which this model lacks ({len(foreign)} of its {len(allocation.widths)} names): was it made for another model?")
            for name, (_, cols) in linear_shapes.items():
                if in_classes(name, quant.tensors):
                    allocated(name, cols, quant, allocation)
    if allocation is None and quant.bpw is None:
        check_shapes(linear_shapes, quant)
    shapes = None
    if quant.bpw is not None:
        if allocation is not None:
            raise ValueError("--allocation already fixes every tensor's widths; drop --bpw")
        shapes = model_shapes(path, quant.tensors, native=quant.native is not None)
        check_budget(quant.bpw, shapes)
    calibrated = quant.method != "rtn"
    if calibrated:
        check_context("--seqlen", calib.seqlen, context_length(path))
    from_file = calibrated and calib.source not in BUILTIN
    text = read_text(calib.source) if from_file else None  # bad files stop here, first
    settings = {
        "model": str(model_name),
        "model_path": str(path.resolve()),  # export reads it from anywhere, not only where quantize ran
        "model_files": model_fingerprint(path),  # weights replaced in place make a checkpoint of the old ones stale
        "architecture": arch,
        **quant.to_dict(),
        "calibration": asdict(calib),
        "calibration_text": short_digest(text) if text is not None else None,  # the file's words, not only its name
        "allocation": allocation.fingerprint() if allocation is not None else None,
    }
    done = finished_with(out_dir, settings)
    if done is not None:
        console.print(f"{out_dir} is a finished checkpoint with these settings: reused, nothing quantized again")
        finished = [qt for _, qt in done.tensors()]
        widths = Counter(w for qt in finished for w in qt.group_widths())
        return QuantizeReport(done.directory, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              None, widths, _types(finished), done.manifest["num_blocks"], Decision.from_dict(done.budget) if done.budget else None)  # fmt: skip
    if calibrated and not from_file and calib.source != "self":
        text = read_text(calib.source)  # a hub dataset: fetched only when quantizing
    model, loader = _open_model(path, whole=calibrated and calib.source == "self")
    tokenizer = load_tokenizer(path)
    layers = decoder_layers(model)
    with CheckpointWriter(out_dir, settings, len(layers)) as writer:  # its work folder locked until the run ends
        resumed = writer.blocks_done
        hidden: list[torch.Tensor] = []
        kwargs_of: dict[str, list[dict]] = {}
        kinds = layer_types(model)
        sample_idx, n_tokens = torch.empty(0, dtype=torch.long), 0
        decision = None
        if calibrated:
            windows = _calibration(calib, model, tokenizer, text, console)
            if shapes is not None:
                if writer.budget is None:
                    scores = _sensitivity_scores(path, model, loader, windows, shapes, quant.sensitivity, dev, console)
                    writer.set_budget(solve(quant.bpw, shapes, scores, quant.sensitivity).to_dict())
                decision = Decision.from_dict(writer.budget)
            elif allocation is not None and allocation.budget is not None:
                if writer.budget is None:
                    writer.set_budget(allocation.budget)
                decision = Decision.from_dict(writer.budget) if stock else None
            ahead = [block_name(i) for i in range(max(kinds.index(kind) for kind in kinds))]  # run to the last kind's first layer
            for name in ahead if loader else ():
                loader.load(name)
            hidden, kwargs_of = capture_block_inputs(model, windows, dev)
            for name in ahead if loader else ():
                loader.release(name)
            n_tokens = windows.numel()
            sample_idx = token_sample(n_tokens, quant.sba_tokens, calib.seed)
        stored = dict(writer.finished_tensors()) if resumed else {}
        width_groups = Counter(w for qt in stored.values() for w in qt.group_widths())
        tensor_types = _types(list(stored.values()))
        with torch.no_grad(), Progress(*_bar_columns(), console=console) as progress:
            task = progress.add_task("quantizing blocks", total=len(layers))
            for i, layer in enumerate(layers):
                if loader:
                    loader.load(block_name(i))
                layer.to(dev)
                batches = list(zip(hidden, kwargs_of.get(kinds[i], [])))
                linears = quantized_linears(model, i, quant)
                if i < resumed:
                    for name, lin in linears.items():
                        lin.weight.data = stored[name].dequantize().to(dev, lin.weight.dtype)
                    outputs = _run_block(layer, batches, dev)
                    progress.update(task, description=f"block {i}: replayed from checkpoint")
                else:
                    tensors, recorded, outputs, rel_err = _quantize_block(
                        i, layer, linears, batches, quant, (None if stock else allocation, decision), (n_tokens, sample_idx), dev
                    )
                    writer.write_block(i, tensors, {"block": i, "rel_output_error": rel_err, **recorded})
                    block_widths = Counter(w for qt in tensors.values() for w in qt.group_widths())
                    block_types = _types(list(tensors.values()))
                    width_groups.update(block_widths)
                    tensor_types.update(block_types)
                    error = f"  out err {rel_err:.2e}" if rel_err is not None else ""
                    topped = len(recorded.get("experts_topped_up", ()))
                    rare = f"  {topped} expert linears topped up" if topped else ""
                    made = _widths_summary(block_widths) or " ".join(f"{k}×{n}" for k, n in sorted(block_types.items()))
                    progress.update(task, description=f"block {i}: {made}{error}{rare}")
                hidden = outputs
                layer.to("cpu")
                if loader:
                    loader.release(block_name(i))
                progress.advance(task)
        wall = time.perf_counter() - started
        versions = {"slim2gguf": __version__, "torch": torch.__version__, "python": platform.python_version()}
        final = writer.finish({"versions": versions})
    peak_dev = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    return QuantizeReport(
        path=final,
        wall_s=wall,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_device_mib=peak_dev,
        width_groups=width_groups,
        tensor_types=tensor_types,
        resumed_from=resumed,
        decision=decision,
    )
