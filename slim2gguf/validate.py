"""Check a slim2gguf file end to end: PyTorch on the file's own bytes against llama.cpp (patched,
or a user's unpatched build for a file of stock types).

Both sides evaluate the same packed weights (PyTorch dequantizes them from the file,
or runs the Triton kernels on them) with the same perplexity method (llama-perplexity's:
windows of ``ctx`` tokens, the second half of each scored). What remains is
llama.cpp's arithmetic (8-bit activations in the dot products, accumulation order)
and its q8_0 embedding/LM head, worth a fraction of a percent; a wrongly decoded
bit, a misplaced row or a broken kernel moves the perplexity far more. Two-bit
models get a wider margin: their larger errors amplify the harmless differences.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import format as fmt
from .calib import CalibrationError
from .devices import pick_device
from .errors import reason
from .from_gguf import GGUFImportError, model_dir_of_file
from .gguf_weights import GGUFSource, packed_from_gguf, slim_weights_from_gguf
from .inspect_gguf import GGUFFileError, dequantize_tensor, field_value, open_gguf
from .models import check_context, load_model, load_tokenizer, resolve_model, set_linear_weights
from .perplexity import PerplexityResult, check_windows, perplexity, read_eval_text, use_backend
from .run import LlamaToolError, check_gguf_path, log_tail, run_tool

TOO_FEW_TOKENS = re.compile(r"you need at least (?P<need>\d+) tokens.*\n.*tokenizes to only (?P<tokens>\d+) tokens")
THRESHOLDS = {2: 0.02}  # by the file's average bits
DEFAULT_THRESHOLD = 0.01
# Below this many scored tokens the gap is mostly the two sides' per-token noise, not a decoding
# fault: 31 tokens of an RTN 4-bit demo file gave 1.3 %, 5,120 of it 0.05 %.
FIRM_VERDICT_TOKENS = 1024
BITS_KEY = "slim2gguf.bits"
# llama.cpp's logger at the pinned commit is never destroyed (common_log_main leaks it on
# purpose), so a tool that exits while the log thread still holds its last lines loses them
# with exit code 0: seen about once in four runs of a tiny model, whose last lines come
# microseconds before exit, and 2-5 times in 8 on a machine whose cores are busy (the log
# thread waits for one). Such a run is repeated; the result is deterministic.
LOG_LOSS_RETRIES = 8
FINAL_ESTIMATE = re.compile(r"Final estimate: PPL = (\S+) \+/-")


class ValidationError(ValueError):
    """Validation could not be run (bad arguments or a file it cannot judge)."""


@dataclass
class ValidationResult:
    """Both perplexities and the verdict: ``passed`` when ``rel_gap <= threshold``."""

    ppl_torch: float
    ppl_llama: float
    rel_gap: float
    threshold: float
    passed: bool
    tokens: int
    ppl_float: float | None = None  # the float model's, when it was given
    kld_float: float | None = None  # mean KL divergence from the float model to the file's (PyTorch)


def judge(ppl_torch: float, ppl_llama: float, threshold: float, tokens: int) -> ValidationResult:
    """Relative gap ``|torch - llama| / llama``; a non-finite perplexity never passes."""
    gap = abs(ppl_torch - ppl_llama) / ppl_llama
    passed = math.isfinite(ppl_torch) and math.isfinite(ppl_llama) and gap <= threshold
    return ValidationResult(ppl_torch, ppl_llama, gap, threshold, passed, tokens)


def default_threshold(reader: gguf.GGUFReader) -> float:
    """2 % for 2-bit files, else 1 %, from the exporter's ``slim2gguf.bits`` key."""
    try:
        bits = field_value(reader, BITS_KEY)
    except GGUFFileError as err:
        raise ValidationError(f"{err}; give a threshold") from err
    if bits is None:
        raise ValidationError(f"the file has no {BITS_KEY} key (not a slim2gguf export?); give a threshold")
    if not isinstance(bits, int):
        raise ValidationError(f"the file's {BITS_KEY} key is {bits!r}, not a number of bits; give a threshold")
    return THRESHOLDS.get(bits, DEFAULT_THRESHOLD)


def file_context_length(reader: gguf.GGUFReader) -> int | None:
    """The context the file's model was made for, from its ``ARCH.context_length`` key (llama.cpp
    reads it to load the model); None where the file does not say."""
    arch = field_value(reader, "general.architecture")
    value = field_value(reader, f"{arch}.context_length") if isinstance(arch, str) else None
    return value if isinstance(value, int) and value > 0 else None


def parse_llama_perplexity(log: str) -> float:
    """The final perplexity in a llama-perplexity log (its "Final estimate: PPL = X +/- E" line)."""
    found = FINAL_ESTIMATE.findall(log)
    if not found:
        raise LlamaToolError(f"llama-perplexity printed no final estimate:\n{log_tail(log)}")
    return float(found[-1])


def llama_perplexity(
    gguf_path: str | os.PathLike, text_path: str | os.PathLike, ctx: int, chunks: int, threads: int | None = None
) -> float:
    """``llama-perplexity -m FILE -f TEXT -c CTX --chunks N [-t THREADS]``: patched, or a
    user's unpatched build for a file of stock types (run.run_tool)."""
    args: list[str | os.PathLike | int] = ["-m", gguf_path, "-f", text_path, "-c", ctx, "--chunks", chunks]
    if threads:
        args += ["-t", threads]
    for _ in range(LOG_LOSS_RETRIES):
        result = run_tool("llama-perplexity", args, gguf_path)
        log = result.stderr + result.stdout
        if FINAL_ESTIMATE.search(log):
            break
        short = TOO_FEW_TOKENS.search(log)
        if short:  # it exits 0 on this refusal, which the user fixes from the command line: one line
            raise ValidationError(
                f"{text_path} has {short['tokens']} tokens; llama-perplexity needs at least {short['need']} "
                f"(twice --ctx {ctx}): give a longer text or a smaller --ctx"
            )
    return parse_llama_perplexity(log)


def _use_file_embeddings(hf_model: torch.nn.Module, gguf_path: GGUFSource) -> None:
    """Token embedding and (untied) LM head as stored in the file; a tied head follows the embedding."""
    reader = gguf_path if isinstance(gguf_path, gguf.GGUFReader) else open_gguf(gguf_path)
    names = {t.name for t in reader.tensors}
    targets = {"token_embd.weight": hf_model.get_input_embeddings(), "output.weight": hf_model.get_output_embeddings()}
    for name, module in targets.items():
        if name in names:
            weight = torch.from_numpy(dequantize_tensor(reader, name).copy())
            if tuple(weight.shape) != tuple(module.weight.shape):
                raise ValidationError(f"{name} {tuple(weight.shape)} does not match the model's {tuple(module.weight.shape)}")
            module.weight.data = weight


def torch_perplexity(
    gguf_path: GGUFSource,
    model: str | os.PathLike,
    text: str,
    ctx: int,
    chunks: int,
    backend: str = "torch",
    device: str | None = None,
    against_float: bool = False,
) -> PerplexityResult:
    """Perplexity of the float model with its linears replaced by the file's SliM weights:
    dequantized (``torch``) or packed and run by the Triton kernels (``triton``); the
    token embedding and LM head are the file's too (e.g. dequantized q8_0). With
    ``against_float``, the untouched float model runs on the same windows and the
    result carries its perplexity and the KL divergence from it."""
    use_backend(backend)
    model_dir = resolve_model(model)
    reference = load_model(model_dir) if against_float else None
    hf_model = load_model(model_dir)
    _use_file_embeddings(hf_model, gguf_path)
    if backend == "torch":
        set_linear_weights(hf_model, slim_weights_from_gguf(gguf_path, model_dir))
    else:
        from .triton_linear import swap_linears

        packed = packed_from_gguf(gguf_path, model_dir)
        if any(not isinstance(stype, fmt.SlimType) for _, stype in packed.values()):
            raise ValidationError("--backend triton runs SliM types only; this file holds stock types: use --backend torch")
        swap_linears(hf_model, packed)
    device = str(pick_device(device or "auto"))
    tokenizer = load_tokenizer(model_dir)
    return perplexity(hf_model, tokenizer, text, ctx, chunks, method="llama", device=device, reference=reference)


@contextlib.contextmanager
def _text_file(text_path: str | Path, text: str) -> Iterator[Path]:
    """The text as a file for llama-perplexity: the user's own, or WikiText-2's written to a
    temporary folder (removed after the run)."""
    if str(text_path) != "wikitext2":
        yield Path(text_path).expanduser()
        return
    try:
        tmp = tempfile.TemporaryDirectory(prefix="slim2gguf-")
    except OSError as err:  # no writable temporary folder at all
        raise ValidationError(f"cannot write WikiText-2's test text for llama-perplexity: {err}; set TMPDIR to a writable folder") from None
    with tmp as folder:
        text_file = Path(folder) / "wikitext2-test.txt"
        try:
            text_file.write_bytes(text.encode("utf-8"))
        except OSError as err:
            raise ValidationError(
                f"cannot write WikiText-2's test text for llama-perplexity in {folder}: {reason(err)}; "
                "set TMPDIR to a folder with a few MB free"
            ) from None
        yield text_file


def validate(
    gguf_path: str | os.PathLike,
    model: str | os.PathLike | None,
    text_path: str | os.PathLike,
    ctx: int = 512,
    chunks: int = 20,
    threshold: float | None = None,
    backend: str = "torch",
    threads: int | None = None,
    device: str | None = None,
) -> ValidationResult:
    """Compare PyTorch's and patched llama.cpp's perplexity of the file on a text file.

    ``model`` is the float model the file was made from (directory, hub id or demo
    name): it supplies everything but the SliM weights, and the result also says how
    far the file is from it (perplexity and KL divergence). Without it the file is read
    alone: transformers rebuilds the model from the file's metadata and tensors (SliM
    ones through format.GGUFDequantizer). ``text_path`` is a file or ``wikitext2``
    (written to a temporary file for llama-perplexity). ``threshold`` defaults to
    2 % for 2-bit files and 1 % otherwise; ``threads`` goes to llama-perplexity,
    ``device`` to PyTorch (default: CUDA when present).
    """
    try:
        use_backend(backend)
        check_windows(ctx, chunks)
        device = str(pick_device(device or "auto"))  # an unknown or absent device was a torch traceback
    except ValueError as err:
        raise ValidationError(str(err)) from None
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise ValidationError(f"--threshold is the largest relative gap that passes: it must be > 0, got {threshold:g}")
    path = check_gguf_path(gguf_path)
    try:
        text = read_eval_text(str(text_path))
    except UnicodeDecodeError as err:
        raise ValidationError(f"{text_path} is not UTF-8 text: {err}") from err
    except CalibrationError as err:  # wikitext2 offline
        raise ValidationError(str(err)) from None
    reader = open_gguf(path)  # a broken file fails here, not after llama-perplexity's run
    try:
        check_context("--ctx", ctx, file_context_length(reader))
    except ValueError as err:
        raise ValidationError(str(err)) from None
    if threshold is None:
        threshold = default_threshold(reader)
    against_float = model is not None
    if model is None:
        try:
            model = model_dir_of_file(path)
        except GGUFImportError as err:
            raise ValidationError(f"{err}; give --model, the model the file was made from") from err
    with _text_file(text_path, text) as text_file:
        ppl_llama = llama_perplexity(path, text_file, ctx, chunks, threads)
    ours = torch_perplexity(reader, model, text, ctx, chunks, backend, device, against_float)
    result = judge(ours.ppl, ppl_llama, threshold, ours.tokens_scored)
    result.ppl_float, result.kld_float = ours.reference_ppl, ours.kld
    return result


def print_validation(result: ValidationResult, console: Console | None = None) -> None:
    """The two perplexities, their gap and the verdict as a table."""
    console = console or Console(markup=False)
    table = Table(title="slim2gguf file validation")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("PyTorch perplexity", f"{result.ppl_torch:.4f}")
    table.add_row("llama.cpp perplexity", f"{result.ppl_llama:.4f}")
    table.add_row("relative gap", f"{100 * result.rel_gap:.3f} %")
    table.add_row("threshold", f"{100 * result.threshold:.3f} %")
    table.add_row("tokens scored", f"{result.tokens:,}")
    if result.kld_float is not None:
        table.add_row("float model perplexity", f"{result.ppl_float:.4f}")
        table.add_row("KL divergence to the float model", f"{result.kld_float:.5f}")
    table.add_row("verdict", Text("PASS", style="green") if result.passed else Text("FAIL", style="red"))
    console.print(table)
    if result.tokens < FIRM_VERDICT_TOKENS:
        console.print(
            f"note: only {result.tokens:,} tokens scored; below {FIRM_VERDICT_TOKENS:,} the gap is mostly noise, "
            "so give a longer text or more --chunks for a firm verdict"
        )
