"""The ``slim2gguf`` command line: quantize, eval, inspect, convert, validate, run."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from . import llamacpp
from .errors import one_line, reason
from .messages import ERROR, INTERRUPTED, WARNING, say

# click's error classes, from wherever this Typer takes click (a copy of its own in recent Typers)
CLICK_ERROR, USAGE_ERROR = (next(c for c in typer.BadParameter.__mro__ if c.__name__ == name) for name in ("ClickException", "UsageError"))
HELP_ASKED = "slim2gguf.help_asked"


class OneLineErrors(TyperGroup):
    """Typer's own refusals (a value that is no int, a missing option, an unknown command) in
    one line, as slim2gguf's errors are: Typer draws them as a usage line and a boxed panel.
    It also notes whether a command's --help was asked, which the group's callback cannot see."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta[HELP_ASKED] = "--help" in args  # the callback runs before a command reads its --help
        return super().parse_args(ctx, args)

    def main(self, *args: object, standalone_mode: bool = True, **kwargs: object) -> object:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except CLICK_ERROR as err:
            if type(err).__name__ != "NoArgsIsHelpError":  # no arguments: Typer printed the help
                ctx = getattr(err, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if isinstance(err, USAGE_ERROR) and ctx is not None else ""
                say(console, ERROR, one_line(Exception(err.format_message())) + hint)
            code = err.exit_code
        except typer.Abort:
            say(console, INTERRUPTED, "aborted")
            code = 1
        raise SystemExit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(llamacpp.app, name="llama-cpp", help="Build the patched llama.cpp that runs SliM files.")
console = Console(stderr=True, markup=False)  # messages carry paths and names: no [...] is a style

ModelArg = typer.Argument(..., help="Hugging Face model directory, GGUF file, hub id (online), 'smollm2-135m' (demo) or 'qwen2.5-coder-1.5b' (benchmark).")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"slim2gguf {__version__}, patch series {llamacpp.patch_series_hash()}, llama.cpp {llamacpp.PINNED_COMMIT}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version, the patch series' hash and the pinned llama.cpp commit."),
) -> None:
    """SliM-LLM mixed-precision quantization, exported to GGUF files for llama.cpp."""
    if not ctx.meta.get(HELP_ASKED):  # a command's help needs no cache
        _check_cache_env()


def _check_cache_env() -> None:
    """$SLIM2GGUF_CACHE, when set, is a folder slim2gguf can write: known before any command
    starts (a file there was a FileExistsError traceback from whichever command used it first)."""
    cache = os.environ.get("SLIM2GGUF_CACHE")
    if not cache:
        return
    path = Path(cache).expanduser()
    if path.exists() and not path.is_dir():
        _fail(f"SLIM2GGUF_CACHE={cache} is not a folder: point it at a folder for slim2gguf's downloads and builds")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _fail(f"SLIM2GGUF_CACHE={cache} cannot be made: {reason(err)}")
    if not os.access(path, os.W_OK | os.X_OK):
        _fail(f"SLIM2GGUF_CACHE={cache} is not writable: point it at a folder slim2gguf can write")


LLAMA_BIN = typer.Option(None, "--llama-cpp-bin", help=f"bin/ folder of your own llama.cpp build (or ${llamacpp.BIN_ENV}): patched for SliM files, any for --format native ones; default: slim2gguf builds a patched one.")


def _use_build(directory: Optional[Path], gguf_path: Path) -> None:
    """Point every tool lookup at the user's build, checked before anything runs: it must
    carry the patches unless the file holds stock types only. The file is checked first, so
    a missing or non-GGUF file is named as such, not as a build that lacks the patches."""
    from .inspect_gguf import GGUFFileError
    from .run import check_gguf_path, holds_slim_types

    try:
        check_gguf_path(gguf_path)
    except (FileNotFoundError, GGUFFileError) as err:
        _fail(str(err))
    if directory is not None:
        os.environ[llamacpp.BIN_ENV] = str(directory)
    if os.environ.get(llamacpp.BIN_ENV):
        try:
            llamacpp.user_build(lambda: not holds_slim_types(gguf_path))
        except llamacpp.LlamaCppError as err:
            _fail(str(err))


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None, line: str | None = None) -> None:
    """slim2gguf's own warnings as one line each, like its errors; others as Python shows them."""
    if category.__module__.startswith("slim2gguf."):
        say(console, WARNING, str(message))
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning, warnings.showwarning = warnings.showwarning, _show_warning


def _fail(message: str) -> None:
    say(console, ERROR, message)
    raise typer.Exit(2)


def _native(format_: str, type_: str | None, bits: int | None, bpw: float | None, reuse: bool = False) -> str | None:
    """The stock type every quantized linear gets (None: SliM types; "auto": --bpw picks,
    or ``reuse``: an --allocation's decision)."""
    from .methods import NATIVE_BY_BUDGET

    if format_ not in ("slim", "native"):
        _fail(f"--format must be slim or native, got {format_!r}")
    if format_ == "slim":
        if type_ is not None:
            _fail("--type picks a stock type: add --format native")
        return None
    if bits is not None:
        _fail("--bits sets SliM widths; with --format native pick a stock type with --type")
    if bpw is not None or reuse:
        if type_ is not None:
            _fail(f"{'--bpw chooses' if bpw is not None else '--allocation gives'} every tensor's stock type: drop --type")
        return NATIVE_BY_BUDGET
    return type_ or DEFAULT_NATIVE_TYPE


SLIM_FLAGS = {"group_size": "--group-size", "sqc_lambda": "--sqc-lambda", "fit": "--fit", "sqc": "--sqc/--no-sqc", "sba": "--sba/--no-sba", "sba_tokens": "--sba-tokens"}


def _settings(method: str, bits: int | None, group_size: int | None, damp: float, sqc_lambda: float | None, sba_tokens: int | None, sba: bool | None, sqc: bool | None, tensors: str | None, fit: str | None, bpw: float | None, sensitivity: str, refit: bool, format_: str = "slim", type_: str | None = None, act_order: bool = False, reuse: bool = False):
    from .architectures import parse_tensor_classes
    from .methods import QuantSettings

    if bits is not None and bpw is not None:
        _fail("give --bits (every tensor the same width) or --bpw (a whole-file budget), not both")
    if bits is not None and reuse:  # it was ignored, and recorded in the manifest as if it held
        _fail("--allocation fixes every tensor's widths, and so its bits: drop --bits")
    if bpw is not None and group_size is not None:  # ignored too: the budget picks both per tensor
        _fail("--bpw chooses every tensor's width and group size: drop --group-size")
    native = _native(format_, type_, bits, bpw, reuse)
    slim_only = {"group_size": group_size, "sqc_lambda": sqc_lambda, "fit": fit, "sqc": sqc, "sba": sba, "sba_tokens": sba_tokens}
    given = {name: value for name, value in slim_only.items() if value is not None}  # the rest: QuantSettings' defaults
    if native is not None and given:  # each was accepted and ignored
        flags = [SLIM_FLAGS[name] for name in given]
        _fail(f"{', '.join(flags)} tune{'s' if len(flags) == 1 else ''} SliM types (per-group widths, scales and offsets); stock types have their own: drop {'it' if len(flags) == 1 else 'them'} with --format native")
    slim_method_only = [SLIM_FLAGS[name] for name in given if name != "group_size"]
    if method in ("gptq", "rtn") and slim_method_only:  # accepted and ignored: gptq and rtn neither allocate nor calibrate
        _fail(f"{', '.join(slim_method_only)} appl{'ies' if len(slim_method_only) == 1 else 'y'} to --method slim only: drop {'it' if len(slim_method_only) == 1 else 'them'} with --method {method}")
    try:
        classes = parse_tensor_classes(tensors) if tensors is not None else None
        return QuantSettings(method, 3 if bits is None else bits, damp=damp, tensors=classes, bpw=bpw, sensitivity=sensitivity, refit=refit, native=native, act_order=act_order, **given)
    except ValueError as err:
        _fail(str(err))


def _summary_table(report, title: str) -> Table:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for width in sorted(report.width_groups):
        table.add_row(f"column groups at {width} bits", str(report.width_groups[width]))
    for name, count in sorted(report.tensor_types.items()):
        table.add_row(f"tensors in {name}", str(count))
    table.add_row("wall time", f"{report.wall_s:.1f} s")
    table.add_row("peak host memory", f"{report.peak_rss_mib:.0f} MiB")
    if report.peak_device_mib is not None:
        table.add_row("peak GPU memory", f"{report.peak_device_mib:.0f} MiB")
    return table


def _print_decision(decision) -> None:
    """Where a --bpw budget went: bits per weight by block and class, and the stock types."""
    from .architectures import tensor_class
    from .budget import choice_bpw
    from .inspect_gguf import bpw_table

    cells = {}
    for name, choice in decision.choices.items():
        cls = tensor_class(name)
        if cls is not None:
            cells[int(name.split(".")[2]), cls] = choice_bpw(choice)
    stock = ", ".join(f"{k} {v.upper()}" for k, v in decision.choices.items() if tensor_class(k) is None)
    title = f"--bpw {decision.target_bpw:g} by {decision.sensitivity} sensitivity: {decision.bpw:.3f} bpw; {stock}"
    console.print(bpw_table(cells, title))


# Options shared by quantize and convert.
BITS = typer.Option(None, "--bits", help="Average width of every quantized tensor: 2, 3 or 4 (default 3).")
DEFAULT_NATIVE_TYPE = "q4_k"
FORMAT = typer.Option("slim", "--format", help="slim (SliM's mixed-width types: the patched CPU build runs them) or native (stock ggml types: every llama.cpp build, Ollama, LM Studio).")
TYPE = typer.Option(None, "--type", help=f"--format native: the stock type of the quantized linears: q8_0, q6_k, q5_k, q4_k, q3_k, q2_k, q5_1, q5_0, q4_1, q4_0, iq4_nl, iq4_xs, iq3_s, iq3_xxs, iq2_s, iq2_xs or iq2_xxs (default {DEFAULT_NATIVE_TYPE}); where a 256-wide type does not divide a tensor's rows, its 32-wide fallback, as llama-quantize.")
BPW = typer.Option(None, "--bpw", help="Whole-file bits per weight (e.g. 2.75): each tensor's width, group size and the embedding/output types are chosen by measured sensitivity.")
SENSITIVITY = typer.Option("fisher", "--sensitivity", help="How --bpw scores tensors: fisher (loss increase) or hessian (relative output error); see docs/BENCHMARKS.md.")
METHOD = typer.Option("slim", "--method", help="slim (SBA + SQC + GPTQ), gptq or rtn.")
GROUP = typer.Option(None, "--group-size", help="SliM columns per group: 128, 64 or 32 (must divide every input size; default: 128).", show_default=False)
CALIB = typer.Option("self", "--calib", help="self (sampled from the model, no download), wikitext2, c4, or a .txt/.jsonl/.parquet file.")
NSAMPLES = typer.Option(128, "--nsamples", help="Calibration windows.")
SEQLEN = typer.Option(512, "--seqlen", help="Tokens per calibration window.")
SEED = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed for calibration sampling; equal seeds give identical outputs.")  # a larger seed gave its low 32 bits' output (5 and 2**32 + 5: the same checkpoint)
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N.")
DAMP = typer.Option(0.3, "--damp", help="Hessian damping, fraction of mean diag(H).")
LAMBDA = typer.Option(None, "--sqc-lambda", help="SQC weight on salient elements (default chosen by measurement, see docs/BENCHMARKS.md).")
SBA_TOKENS = typer.Option(None, "--sba-tokens", help="Calibration tokens used to score SBA's allocations (subsample; default: 1024).", show_default=False)
SBA = typer.Option(None, "--sba/--no-sba", help="Salience-determined bit allocation (slim only; default: on).", show_default=False)
SQC = typer.Option(None, "--sqc/--no-sqc", help="Quantizer calibration (slim only; off: min-max scales; default: on).", show_default=False)
FIT = typer.Option(None, "--fit", help="SliM quantizer calibration objective: wls (least squares weighted by the inputs' energy, as an importance matrix; the default) or sqc (SliM's salience-weighted grid).", show_default=False)
REFIT = typer.Option(True, "--refit/--no-refit", help="After GPTQ, re-solve each row's scales and offsets for its codes under the calibration Hessian (slim only).")
ACT_ORDER = typer.Option(False, "--act-order/--no-act-order", help="GPTQ visits inputs by decreasing energy, each group's scales fitted before the pass (slim and gptq; not the IQ2/IQ3 lattice types).")
ALLOCATION = typer.Option(None, "--allocation", help="Reuse the widths (and --bpw decision) of a checkpoint manifest or {name: [widths]} JSON; with --format native, a --bpw run's stock type per tensor.")
TENSORS = typer.Option(None, "--tensors", help="Quantize only these classes (e.g. ffn_down or attn_v,ffn_down); the rest stay float (F16 in the file).")


def _quantize(model, out, bits, method, group_size, calib, nsamples, seqlen, seed, device, damp, sqc_lambda, sba_tokens, sba, sqc, allocation, tensors, fit, bpw, sensitivity, refit, format_="slim", type_=None, act_order=False):
    from .checkpoint import MANIFEST, CheckpointError, partial_dir
    from .models import ModelError
    from .pipeline import CalibSettings, load_allocation, quantize_model

    quant = _settings(method, bits, group_size, damp, sqc_lambda, sba_tokens, sba, sqc, tensors, fit, bpw, sensitivity, refit, format_, type_, act_order, allocation is not None)
    _check_checkpoint_dir(out)
    try:
        alloc = load_allocation(allocation) if allocation else None
        recorded = sorted(set(alloc.group_sizes.values())) if alloc is not None else []
        if group_size is not None and recorded and recorded != [group_size]:  # the manifest's sizes were used, this one ignored
            _fail(f"--allocation {allocation} records each tensor's group size ({', '.join(map(str, recorded))}): drop --group-size")
        return quantize_model(model, out, quant, CalibSettings(calib, nsamples, seqlen, seed), device, alloc, console)
    except KeyboardInterrupt:
        work = partial_dir(Path(out))
        if (work / MANIFEST).exists():  # a block or --bpw budget recorded
            say(console, INTERRUPTED, f"finished work is kept in {work}; rerun the same command to resume")
        else:
            say(console, Text("interrupted", style="yellow"), "before the first block finished: nothing was written")
        raise typer.Exit(130)
    except (ModelError, CheckpointError, ValueError, FileNotFoundError) as err:
        _fail(str(err))


@app.command()
def quantize(
    model: str = ModelArg,
    out: Path = typer.Option(..., "-o", "--out", help="Checkpoint directory to write."),
    bits: int = BITS, method: str = METHOD, group_size: Optional[int] = GROUP, calib: str = CALIB,
    nsamples: int = NSAMPLES, seqlen: int = SEQLEN, seed: int = SEED, device: str = DEVICE,
    damp: float = DAMP, sqc_lambda: Optional[float] = LAMBDA, sba_tokens: Optional[int] = SBA_TOKENS,
    sba: Optional[bool] = SBA, sqc: Optional[bool] = SQC, fit: Optional[str] = FIT, allocation: Optional[Path] = ALLOCATION, tensors: Optional[str] = TENSORS,
    bpw: Optional[float] = BPW, sensitivity: str = SENSITIVITY, refit: bool = REFIT, format_: str = FORMAT, type_: Optional[str] = TYPE, act_order: bool = ACT_ORDER,
) -> None:
    """Quantize a model into a checkpoint (resumable; written atomically)."""
    report = _quantize(model, out, bits, method, group_size, calib, nsamples, seqlen, seed, device, damp, sqc_lambda, sba_tokens, sba, sqc, allocation, tensors, fit, bpw, sensitivity, refit, format_, type_, act_order)
    if report.decision is not None:
        _print_decision(report.decision)
    if allocation is not None:
        what = f"--allocation {allocation.name}"
    elif bpw is not None:
        what = f"--bpw {bpw:g}"
    else:
        what = (type_ or DEFAULT_NATIVE_TYPE).upper() if format_ == "native" else f"{bits or 3}-bit"
    console.print(_summary_table(report, f"{method} {what} checkpoint: {report.path}"))


@app.command("eval")
def eval_cmd(
    model: str = ModelArg,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Evaluate this quantized checkpoint (dequantized stored values)."),
    text: str = typer.Option(..., "--text", help="Text file to score, or 'wikitext2' (test split, online)."),
    ctx: int = typer.Option(512, "--ctx"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Score only the first N windows."),
    method: str = typer.Option("llama", "--method", help="llama (as llama-perplexity: second half of each window) or full."),
    backend: str = typer.Option("torch", "--backend", help="torch (dequantize, then matmul) or triton (kernels on the packed bytes)."),
    device: str = DEVICE,
) -> None:
    """Perplexity of the original model or of a quantized checkpoint, in PyTorch."""
    from .checkpoint import Checkpoint, CheckpointError
    from .devices import pick_device
    from .models import ModelError, check_context, context_length, load_model, load_tokenizer, resolve_model, set_linear_weights
    from .perplexity import check_windows, perplexity, read_eval_text, use_backend

    try:
        check_windows(ctx, chunks, method)
        use_backend(backend)
        dev = pick_device(device)
        eval_text = read_eval_text(text)
        path = resolve_model(model)
        check_context("--ctx", ctx, context_length(path))
        net = load_model(path)
        if checkpoint is not None and backend == "triton":
            from . import format as fmt
            from .triton_linear import swap_linears

            tensors = dict(Checkpoint(checkpoint).tensors())
            if any(not isinstance(qt.stype, fmt.SlimType) for qt in tensors.values()):
                raise ValueError("--backend triton runs SliM types only; this checkpoint holds stock types: use --backend torch")
            swap_linears(net, {n: (qt.pack(), qt.stype) for n, qt in tensors.items()})
        elif checkpoint is not None:
            set_linear_weights(net, {n: qt.dequantize() for n, qt in Checkpoint(checkpoint).tensors()})
        result = perplexity(net, load_tokenizer(path), eval_text, ctx, chunks, method, device=dev)
    except (ModelError, CheckpointError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"perplexity {result.ppl:.4f} over {result.tokens_scored} tokens ({result.chunks} chunks of {ctx}, method {method})")


@app.command()
def inspect(path: Path = typer.Argument(..., help="A GGUF file.")) -> None:
    """Per-tensor type, shape, width histogram and bits per weight of a GGUF file."""
    from .inspect_gguf import GGUFFileError, print_inspect

    try:
        print_inspect(path, Console(markup=False))
    except GGUFFileError as err:
        _fail(str(err))


def _default_checkpoint(out: Path) -> Path:
    """Resume state for ``convert``: in the cache, keyed on the output path."""
    from .paths import cache_dir, short_digest

    key = short_digest(str(out.resolve()))
    return cache_dir() / "checkpoints" / f"{out.stem}-{key}"


@app.command()
def convert(
    model: str = ModelArg,
    out: Path = typer.Option(..., "-o", "--out", help="GGUF file to write."),
    bits: int = BITS, method: str = METHOD, group_size: Optional[int] = GROUP, calib: str = CALIB,
    nsamples: int = NSAMPLES, seqlen: int = SEQLEN, seed: int = SEED, device: str = DEVICE,
    damp: float = DAMP, sqc_lambda: Optional[float] = LAMBDA, sba_tokens: Optional[int] = SBA_TOKENS,
    sba: Optional[bool] = SBA, sqc: Optional[bool] = SQC, fit: Optional[str] = FIT, allocation: Optional[Path] = ALLOCATION, tensors: Optional[str] = TENSORS,
    bpw: Optional[float] = BPW, sensitivity: str = SENSITIVITY, refit: bool = REFIT, format_: str = FORMAT, type_: Optional[str] = TYPE, act_order: bool = ACT_ORDER,
    embed_type: Optional[str] = typer.Option(None, "--embed-type", help="Token embedding type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k, q5_k, q4_k, q3_k, q2_k (default: --bpw's choice, else q8_0)."),
    output_type: Optional[str] = typer.Option(None, "--output-type", help="Untied LM head type, as --embed-type."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Keep the quantized checkpoint here (default: a cache folder, removed after a successful export)."),
) -> None:
    """Quantize a Hugging Face model and write one GGUF file for patched llama.cpp.

    A rerun with the same settings reuses the finished checkpoint of an earlier run
    whose export failed or was interrupted, and only exports."""
    import shutil

    local = Path(model).expanduser()  # a folder or a GGUF file; not a hub id or a named model
    _check_writable(out, *([local] if local.exists() else []), *([checkpoint] if checkpoint is not None else []))
    if bpw is not None and (embed_type or output_type):
        _fail("--bpw chooses the token embedding's and output's types within the budget; drop --embed-type/--output-type")
    _check_export_types(embed_type, output_type)
    try:
        llamacpp.ensure_source()  # the export needs llama.cpp's converter: know before quantizing
    except llamacpp.LlamaCppError as err:
        _fail(f"llama.cpp's source (its converter writes the file) cannot be obtained: {err}")
    ckpt_dir = checkpoint or _default_checkpoint(out)
    report = _quantize(model, ckpt_dir, bits, method, group_size, calib, nsamples, seqlen, seed, device, damp, sqc_lambda, sba_tokens, sba, sqc, allocation, tensors, fit, bpw, sensitivity, refit, format_, type_, act_order)
    exported = _export(report.path, out, embed_type, output_type, quantized_now=True)
    if checkpoint is None:
        shutil.rmtree(report.path, ignore_errors=True)
    if report.decision is not None:
        _print_decision(report.decision)
    table = _summary_table(report, f"{out}")
    _add_export_rows(table, exported)
    console.print(table)


def _check_export_types(embed_type: str | None, output_type: str | None) -> None:
    from .export import ExportError, check_standard_type

    try:
        for choice, what in ((embed_type, "embedding"), (output_type, "output")):
            if choice is not None:
                check_standard_type(choice, what)
    except ExportError as err:
        _fail(str(err))


def _check_writable(out: Path, *inputs: Path) -> None:
    """The GGUF output can be written without destroying anything: not a folder, not a device
    (the file is renamed over it), not one of ``inputs`` (what the command reads) or inside one."""
    if out.is_dir():
        _fail(f"{out} is a directory")
    if out.exists() and not out.is_file():
        _fail(f"{out} is not a regular file (a device or a pipe): the GGUF file would replace it; give a file name")
    target = out.resolve()
    for source in inputs:
        if target.is_relative_to(source.resolve()):  # the input itself, or a file inside it
            _fail(f"{out} would overwrite {source}, which this command reads: write the file elsewhere")
    _check_parent_writable(out)


def _check_checkpoint_dir(ckpt: Path) -> None:
    """A checkpoint folder can be made at ``ckpt`` (its work folder beside it, the folders above
    it made as needed), known before quantizing. Only an older checkpoint is replaced: a model
    folder or the user's own files named by mistake are refused, never moved or deleted."""
    from .checkpoint import replaceable

    if ckpt.name in ("", ".", ".."):
        _fail(f"{ckpt} names no new folder: give the checkpoint a folder of its own, e.g. {Path('checkpoints') / 'model-3bit'}")
    if ckpt.exists() and not ckpt.is_dir():
        _fail(f"{ckpt} is a file, not a checkpoint folder")
    if not replaceable(ckpt):
        _fail(f"{ckpt} holds files that are not a slim2gguf checkpoint: give a new or empty folder (only an older checkpoint is replaced)")
    try:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _fail(f"cannot write {ckpt}: {reason(err)}")
    _check_parent_writable(ckpt)


def _check_parent_writable(out: Path) -> None:
    if not out.parent.is_dir():
        _fail(f"cannot write {out}: directory {out.parent} does not exist")
    try:
        probe = out.parent / f".{out.name}.probe"
        probe.touch()
        probe.unlink()
    except OSError as err:
        _fail(f"cannot write {out}: {reason(err)}")


def _export(ckpt: Path, out: Path, embed_type: str | None, output_type: str | None, quantized_now: bool = False):
    """Export ``ckpt``; ``quantized_now`` (convert): a failure says the checkpoint is kept."""
    from .checkpoint import CheckpointError
    from .export import ExportError, export_gguf

    try:
        return export_gguf(ckpt, out, embed_type, output_type)
    except KeyboardInterrupt:
        say(
            console,
            INTERRUPTED,
            f"no output written; the checkpoint in {ckpt} is complete: rerun the same "
            f"command (it exports without quantizing again) or run slim2gguf export {ckpt} -o {out}",
        )
        raise typer.Exit(130)
    except (ExportError, CheckpointError, llamacpp.LlamaCppError) as err:
        kept = f"; the quantized checkpoint in {ckpt} is kept: rerun the same command to export it without quantizing again"
        _fail(f"{err}{kept if quantized_now else ''}")


def _add_export_rows(table: Table, exported) -> None:
    table.add_row("quantized tensors bpw", f"{exported.slim_bpw:.3f}")
    table.add_row("whole file bpw", f"{exported.file_bpw:.3f}")
    table.add_row("file size", f"{exported.path.stat().st_size / 2**20:.1f} MiB")


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A finished checkpoint (from quantize, or convert --checkpoint)."),
    out: Path = typer.Option(..., "-o", "--out", help="GGUF file to write."),
    embed_type: Optional[str] = typer.Option(None, "--embed-type", help="Token embedding type, as for convert (default: the checkpoint's --bpw choice, else q8_0)."),
    output_type: Optional[str] = typer.Option(None, "--output-type", help="Untied LM head type, as --embed-type."),
) -> None:
    """Write a finished checkpoint as one GGUF file for patched llama.cpp."""
    _check_writable(out, checkpoint)
    table = Table(title=str(out))
    table.add_column("what")
    table.add_column("value", justify="right")
    _add_export_rows(table, _export(checkpoint, out, embed_type, output_type))
    console.print(table)


@app.command()
def validate(
    path: Path = typer.Argument(..., help="A GGUF file slim2gguf wrote (SliM or --format native)."),
    model: Optional[str] = typer.Option(None, "--model", help="The float model the file was made from (default: the file alone, rebuilt from its own metadata and tensors)."),
    text: str = typer.Option(..., "--text", help="Text file to score (read as bytes, as llama-perplexity does), or 'wikitext2' (test split, online)."),
    ctx: int = typer.Option(512, "--ctx"),
    chunks: int = typer.Option(20, "--chunks"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Largest relative gap that passes (default 0.02 at 2 bits, else 0.01)."),
    backend: str = typer.Option("torch", "--backend", help="torch (dequantize, then matmul) or triton (kernels on the packed bytes)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama-perplexity threads."),
    device: Optional[str] = typer.Option(None, "--device", help="PyTorch device (default: CUDA when present)."),
    llama_cpp_bin: Optional[Path] = LLAMA_BIN,
) -> None:
    """Perplexity of the packed weights in PyTorch and in llama.cpp; fails on a gap."""
    from .gguf_weights import GGUFWeightsError
    from .inspect_gguf import GGUFFileError
    from .models import ModelError
    from .run import LlamaToolError
    from .validate import ValidationError, print_validation
    from .validate import validate as run_validation

    _use_build(llama_cpp_bin, path)
    try:
        result = run_validation(path, model, text, ctx, chunks, threshold, backend, threads, device)
    except (GGUFFileError, GGUFWeightsError, ModelError, LlamaToolError, ValidationError, FileNotFoundError, llamacpp.LlamaCppError) as err:
        _fail(str(err))
    print_validation(result, Console(markup=False))
    if not result.passed:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="A GGUF file slim2gguf wrote (SliM or --format native)."),
    prompt: str = typer.Option(..., "-p", "--prompt"),
    n_predict: int = typer.Option(64, "-n", "--n-predict", help="Tokens to generate (the text is printed when they are done).", min=0, max=2**31 - 1),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=2**31 - 1),
    seed: int = typer.Option(0, "--seed"),
    llama_cpp_bin: Optional[Path] = LLAMA_BIN,
) -> None:
    """Generate text from a slim2gguf file with llama-completion (patched, or your own build for a
    --format native file): greedy unless llama.cpp flags after the options say otherwise (e.g.
    -c 4096 --temp 0.7 --top-p 0.9)."""
    from .run import LlamaToolError, run_completion

    if not prompt:  # llama-completion stops with its whole log and "input is empty"
        _fail("--prompt is empty: give the text the model continues")
    _use_build(llama_cpp_bin, path)
    try:
        generated = run_completion(path, prompt, n_predict, threads, seed, ctx.args)
    except (LlamaToolError, FileNotFoundError, llamacpp.LlamaCppError) as err:
        _fail(str(err))
    typer.echo(prompt + generated)
