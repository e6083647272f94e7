"""The quality frontier: llama.cpp's quantization types against slim2gguf's files, on one
model, in one run, measured by one llama.cpp build on one text.

Why: users pick the GGUF file with the most quality for its size, so every quality claim
is a point on this plot. For each file: whole-file bits per weight (every tensor, as
users compare files), bits per weight of the quantized block tensors, perplexity, mean
and 99th-percentile KL divergence to F16, and how often its top token is F16's
(llama-perplexity --kl-divergence on WikiText-2 test, LF endings). llama.cpp's files are
made by llama-quantize from the upstream converter's F16 file, each with an importance
matrix that llama-imatrix computes on the calibration text over as many tokens as our
files are calibrated on (--calib-chunks windows of --ctx tokens); ours by
`slim2gguf convert` from the same text.

Tensor-level mode (--tensors ffn_down) quantizes one class of tensors and keeps every
other tensor F16 (ours stay float in calibration too), so a quantizer change is
compared with llama.cpp's types in minutes. Every step's output is kept in the work
folder: a rerun reuses files and results whose inputs (file bytes, llama.cpp build,
settings, slim2gguf's code for our files) are unchanged, and an interrupted run resumes.

    python scripts/bench_frontier.py --quick                                  # CI: a few minutes
    python scripts/bench_frontier.py --model smollm2-135m --tensors ffn_down  # tensor-level table
    python scripts/bench_frontier.py --model qwen2.5-coder-1.5b --chunks 40   # the frontier (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import (  # noqa: E402  (the llama.cpp steps and parsers this harness shares)
    BenchError,
    Unavailable,
    console,
    convert_f16,
    inspect_file,
    make_imatrix,
    parse_bench,
    parse_kld_stats,
    quantize_refusal,
    save_png,
    timed_tool,
)
from bench_quant import lf_text  # noqa: E402

from slim2gguf.architectures import TENSOR_CLASSES, in_classes, parse_tensor_classes  # noqa: E402
from slim2gguf.atomic import atomic_path, write_bytes_atomic  # noqa: E402
from slim2gguf.llamacpp import PINNED_COMMIT, LlamaCppError, build_key, ensure_source  # noqa: E402
from slim2gguf.named_models import find as find_named  # noqa: E402
from slim2gguf.paths import cache_dir, source_digest  # noqa: E402
from slim2gguf.run import LlamaToolError  # noqa: E402
from slim2gguf.storage import NATIVE_TYPES  # noqa: E402
from slim2gguf.validate import parse_llama_perplexity  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
REFERENCE = "F16"
SPEED_PROMPT, SPEED_GENERATE = 512, 128  # llama-bench pp512 and tg128 (--speed)
# every llama.cpp file type a user picks from, as llama-quantize names them
MODEL_TYPES = (
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "Q2_K", "IQ3_XXS", "IQ3_XS", "IQ3_S",
    "IQ3_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "IQ4_NL", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0",
)  # fmt: skip
# the ggml types one class of tensors is stored in (tensor-level mode)
TENSOR_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "IQ4_NL", "Q4_K", "Q4_0",
                "Q4_1", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")  # fmt: skip
QUICK = {"model": "smollm2-135m", "tensors": "ffn_down", "chunks": 4, "calib_chunks": 8,
         "types": "IQ2_XS,Q3_K,IQ4_NL", "ours": "slim2-g64"}  # fmt: skip
_RECIPE = re.compile(r"^(slim|gptq|rtn)([234])-g(32|64|128)$")
_NATIVE = re.compile(r"^(slim|gptq|rtn)-(" + "|".join(NATIVE_TYPES) + r")$")
ACT_ORDER = "-ao"
NATIVE_BUDGET = "-native"
_BUDGET = re.compile(r"^bpw(\d+(?:\.\d+)?)(?:-(fisher|hessian))?(" + NATIVE_BUDGET + ")?$")
REUSED_SCORES = "sensitivity: reusing the scores"  # what convert prints when a --bpw run skips the measurement


@dataclass(frozen=True)
class Recipe:
    """One of our files: method, average bits and group size ('slim3-g64'), a whole-file
    budget spent by sensitivity on SliM types ('bpw3.1', 'bpw3.1-hessian') or on stock
    types ('bpw3.1-native': --format native), or a method and a stock type (--format
    native: 'slim-q4_k')."""

    method: str
    bits: int
    group_size: int
    bpw: float | None = None
    sensitivity: str = "fisher"
    native: str | None = None
    native_budget: bool = False  # a budget spent on stock types (--bpw with --format native)
    act_order: bool = False  # "-ao" after a recipe: --act-order

    @classmethod
    def parse(cls, text: str) -> Recipe:
        if text.endswith(ACT_ORDER):
            recipe = cls.parse(text.removesuffix(ACT_ORDER))
            if recipe.method == "rtn" or recipe.bpw is not None:
                raise BenchError(f"{text!r}: act-order ('{ACT_ORDER}') orders GPTQ: add it to a slim or gptq recipe of fixed bits or type")
            return replace(recipe, act_order=True)
        budget = _BUDGET.match(text)
        if budget is not None:
            return cls("slim", 0, 0, float(budget[1]), budget[2] or "fisher", native_budget=budget[3] is not None)
        native = _NATIVE.match(text)
        if native is not None:
            return cls(native[1], 0, 0, native=native[2])
        match = _RECIPE.match(text)
        if match is None:
            raise BenchError(
                f"{text!r} is not a recipe like slim3-g64 (method slim/gptq/rtn, bits 2-4, group 32/64/128), "
                "bpw3.1[-hessian][-native] or slim-q4_k"
            )
        return cls(match[1], int(match[2]), int(match[3]))

    @property
    def name(self) -> str:
        return self._base_name + (ACT_ORDER if self.act_order else "")

    @property
    def _base_name(self) -> str:
        if self.bpw is not None:
            sensitivity = "" if self.sensitivity == "fisher" else f"-{self.sensitivity}"
            return f"bpw{self.bpw:g}{sensitivity}" + (NATIVE_BUDGET if self.native_budget else "")
        if self.native is not None:
            return f"{self.method}-{self.native}"
        return f"{self.method}{self.bits}-g{self.group_size}"

    def options(self) -> list[str | int | float]:
        """What `slim2gguf convert` is told."""
        order = ["--act-order"] if self.act_order else []
        if self.native is not None:
            return ["--method", self.method, "--format", "native", "--type", self.native, *order]
        if self.bpw is not None:
            stock = ["--format", "native"] if self.native_budget else []
            return ["--method", self.method, "--bpw", self.bpw, "--sensitivity", self.sensitivity, *stock]
        return ["--method", self.method, "--bits", self.bits, "--group-size", self.group_size, *order]


@dataclass
class Job:
    """One file to make and measure."""

    name: str
    family: str  # "llama.cpp" or "slim2gguf"
    type: str  # llama-quantize's type name, or our recipe
    path: Path
    recipe: Recipe | None = None


# --- what to measure ---------------------------------------------------------------------


def code_key() -> str:
    """slim2gguf's source: our files are made again when it changes."""
    return source_digest()[:12]


def fitting_groups(shapes: dict[str, tuple[int, int]], tensors: tuple[str, ...] | None) -> list[int]:
    """The group sizes that divide every quantized linear's input size."""
    inputs = {cols for name, (_, cols) in shapes.items() if in_classes(name, tensors)}
    return [g for g in (128, 64, 32) if all(c % g == 0 for c in inputs)]


def default_recipes(shapes: dict[str, tuple[int, int]], tensors: tuple[str, ...] | None) -> list[str]:
    """Every SliM budget we offer (bits 2-4 × groups 128/64/32) that fits the quantized
    linears' input sizes."""
    return [f"slim{b}-g{g}" for b in (2, 3, 4) for g in fitting_groups(shapes, tensors)]


def plan(args: argparse.Namespace, work: Path, shapes: dict[str, tuple[int, int]]) -> list[Job]:
    """F16 first (the reference), then llama.cpp's types, then ours."""
    tensors = args.tensor_classes
    suffix = f"-{'+'.join(tensors)}" if tensors else ""
    calib = f"{Path(args.calib).stem}-{args.calib_chunks}x{args.ctx}"
    known = TENSOR_TYPES if tensors else MODEL_TYPES
    types = [t.upper() for t in args.types.split(",") if t] if args.types is not None else list(known)
    unknown = [t for t in types if t not in known]
    if unknown:
        raise BenchError(f"unknown type {', '.join(unknown)} for this mode; choose from {', '.join(known)}")
    jobs = [Job(REFERENCE, "llama.cpp", REFERENCE, work / "convert-f16.gguf")]
    jobs += [Job(t, "llama.cpp", t, work / f"{t}{suffix}-imatrix-{calib}.gguf") for t in types if t != REFERENCE]
    recipes = args.ours.split(",") if args.ours is not None else default_recipes(shapes, tensors)
    code = code_key()
    groups = fitting_groups(shapes, tensors)
    for text in (r for r in recipes if r):
        recipe = Recipe.parse(text)
        if recipe.bpw is not None and tensors:
            raise BenchError(f"{recipe.name} is a whole-file budget: measure it without --tensors")
        if recipe.bpw is None and recipe.native is None and recipe.group_size not in groups:
            raise BenchError(f"{recipe.name}: group {recipe.group_size} does not divide every quantized input size; use g{', g'.join(map(str, groups))}")
        path = work / f"{recipe.name}{suffix}-{calib}-s{args.seed}-{code}.gguf"
        jobs.append(Job(recipe.name, "slim2gguf", recipe.name, path, recipe))
    return jobs


# --- making the files --------------------------------------------------------------------


def quantize_llama(job: Job, args: argparse.Namespace, f16: Path, imatrix: Path) -> None:
    """llama-quantize with the importance matrix; in tensor-level mode every class but the
    selected one, the token embedding and the output stay F16."""
    opts: list[str | os.PathLike | int] = ["--imatrix", imatrix]
    ftype = job.type
    if args.tensor_classes:
        opts += ["--token-embedding-type", "f16", "--output-tensor-type", "f16"]
        for cls in TENSOR_CLASSES:
            opts += ["--tensor-type", f"{cls}={job.type.lower() if cls in args.tensor_classes else 'f16'}"]
    log = job.path.parent / "logs" / f"{job.path.stem}.quantize.log"
    try:
        with atomic_path(job.path) as tmp:
            timed_tool("llama-quantize", [*opts, f16, tmp, ftype, args.threads], f"llama-quantize {job.name}", log)
    except BenchError as err:
        reason = quantize_refusal(str(err))
        if reason is None:
            raise
        raise Unavailable(f"llama-quantize cannot make {job.name} for this model: {reason}") from None


def convert_ours(job: Job, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """`slim2gguf convert` in its own process: its wall time and peak RSS are the file's cost.
    The checkpoint is kept in the work folder until the file is written, so an interrupted
    conversion resumes."""
    recipe = job.recipe
    assert recipe is not None
    ckpt = work / "checkpoints" / job.path.stem
    cmd = [
        sys.executable, "-m", "slim2gguf", "convert", args.model, "-o", job.path, *recipe.options(), "--calib", args.calib,
        "--nsamples", args.calib_chunks, "--seqlen", args.ctx, "--seed", args.seed, "--checkpoint", ckpt,
    ]  # fmt: skip
    if args.tensor_classes:
        cmd += ["--tensors", ",".join(args.tensor_classes), "--embed-type", "f16", "--output-type", "f16"]
    log = work / "logs" / f"{job.path.stem}.convert.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out, console.status(f"slim2gguf convert {job.name}…"):
        out.write("$ " + " ".join(map(str, cmd)) + "\n")
        out.flush()
        env = dict(os.environ, COLUMNS="120")
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise BenchError(f"slim2gguf convert {job.name} failed (log: {log}):\n{tail}")
    shutil.rmtree(ckpt, ignore_errors=True)
    reused = REUSED_SCORES in log.read_text(errors="replace")  # a --bpw file whose sensitivity pass an earlier one made
    console.print(f"  slim2gguf convert {job.name}: {seconds:.0f} s" + (" (sensitivity scores reused)" if reused else ""))
    return {"quant_s": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024), **({"scores_reused": True} if reused else {})}


def make(job: Job, args: argparse.Namespace, work: Path, f16: Path, imatrix: Path | None) -> dict[str, float]:
    """Write ``job.path`` unless it is there; what making it cost (kept beside the file)."""
    cost_path = job.path.with_suffix(".cost.json")
    if job.path.exists():
        return json.loads(cost_path.read_text()) if cost_path.exists() else {}
    if job.recipe is not None:
        cost = convert_ours(job, args, work)
    else:
        assert imatrix is not None
        t0 = time.perf_counter()
        quantize_llama(job, args, f16, imatrix)
        cost = {"quant_s": round(time.perf_counter() - t0, 1)}
    write_bytes_atomic(cost_path, json.dumps(cost).encode())
    return cost


# --- measuring ---------------------------------------------------------------------------


def bits_per_weight(rows: list[dict[str, Any]], tensors: tuple[str, ...] | None) -> dict[str, float]:
    """Whole file (every tensor), and the quantized block tensors: all block weights (2-D,
    and 3-D stacks of experts), or in tensor-level mode only the selected classes'."""

    def quantized(row: dict[str, Any]) -> bool:
        if not (row["name"].startswith("blk.") and len(row["shape"]) >= 2):
            return False
        return tensors is None or row["name"].split(".")[2] in tensors

    blocks = [r for r in rows if quantized(r)]
    if not blocks:
        raise BenchError("the file has no block weights of the measured classes")
    return {
        "bpw_file": 8 * sum(r["bytes"] for r in rows) / sum(r["params"] for r in rows),
        "bpw_blocks": 8 * sum(r["bytes"] for r in blocks) / sum(r["params"] for r in blocks),
        "file_mib": sum(r["bytes"] for r in rows) / 2**20,
    }


def measure(job: Job, args: argparse.Namespace, work: Path, src: Path, text: Path, logits: Path, cost: dict) -> dict[str, Any]:
    """The file's record, reusing one saved for the same file bytes, build and evaluation."""
    key = f"c{args.chunks}x{args.ctx}-{Path(args.text).name}"
    saved = work / "results" / f"{job.path.stem}-{key}.json"
    st = job.path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "build": build_key()}
    if saved.exists():
        res = json.loads(saved.read_text())
        if res.get("stamp") == stamp and (job.name != REFERENCE or logits.exists()):
            return res["record"]
    base = ["-m", job.path, "-f", text, "-c", args.ctx, "--chunks", args.chunks, "-t", args.threads]
    logs = work / "logs"
    if job.name == REFERENCE:
        with atomic_path(logits) as tmp:
            what = f"{job.name}: perplexity, saving its logits for KLD"
            result, _ = timed_tool("llama-perplexity", [*base, "--kl-divergence-base", tmp], what, logs / f"{saved.stem}.log")
        stats = {"ppl": parse_llama_perplexity(result.stdout + result.stderr), "kld_mean": 0.0, "kld_p99": 0.0, "same_top_pct": 100.0}
    else:
        what = f"{job.name}: perplexity and KLD to F16"
        args_kld = [*base, "--kl-divergence-base", logits, "--kl-divergence"]
        result, _ = timed_tool("llama-perplexity", args_kld, what, logs / f"{saved.stem}.log")
        stats = parse_kld_stats(result.stdout + result.stderr)
    record = {
        "name": job.name, "family": job.family, "type": job.type,
        **bits_per_weight(inspect_file(job.path, src), args.tensor_classes), **stats, **cost,
    }  # fmt: skip
    write_bytes_atomic(saved, json.dumps({"stamp": stamp, "record": record}, indent=1).encode())
    return record


# --- reporting ---------------------------------------------------------------------------


def measure_speed(measured: list[tuple[Job, dict[str, Any]]], rounds: int, threads: int, work: Path) -> None:
    """llama-bench pp512 and tg128 of every file, side by side: each round runs every file
    once in turn, so a slow spell of a shared machine hits all of them alike; each record
    gets the median of its rounds (``pp512_ts``, ``tg128_ts``: tokens per second). Never
    cached: speed is the machine's now."""
    samples: dict[str, dict[str, list[float]]] = {job.name: {} for job, _ in measured}
    for i in range(rounds):
        for job, _ in measured:
            result, _ = timed_tool(
                "llama-bench",
                ["-m", job.path, "-p", SPEED_PROMPT, "-n", SPEED_GENERATE, "-t", threads, "-r", 1, "-o", "json"],
                f"round {i + 1}/{rounds}, {job.name}: llama-bench pp{SPEED_PROMPT} tg{SPEED_GENERATE}",
                work / "logs" / f"{job.path.stem}.bench.log",
            )
            for test, value in parse_bench(result.stdout).items():
                samples[job.name].setdefault(test, []).append(value["ts"])
    for job, record in measured:
        for test, values in samples[job.name].items():
            record[f"{test}_ts"] = statistics.median(values)


def markdown(records: list[dict[str, Any]], header: str, x: str) -> str:
    speed = any(f"pp{SPEED_PROMPT}_ts" in r for r in records)
    columns = ["file", "by", "MiB", "bpw file", "bpw blocks", "PPL", "mean KLD", "99% KLD", "same top %", "make s", "peak RSS MiB"]
    columns += [f"pp{SPEED_PROMPT} t/s", f"tg{SPEED_GENERATE} t/s"] if speed else []
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted(records, key=lambda r: (r[x], r["family"])):
        cells = [
            r["name"], r["family"], f"{r['file_mib']:.1f}", f"{r['bpw_file']:.3f}", f"{r['bpw_blocks']:.3f}", f"{r['ppl']:.3f}",
            f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}", f"{r['same_top_pct']:.2f}",
            f"{r['quant_s']:.0f}" if "quant_s" in r else "", str(r.get("peak_rss_mib", "")),
        ]  # fmt: skip
        if speed:
            cells += [f"{r[key]:.2f}" if key in r else "" for key in (f"pp{SPEED_PROMPT}_ts", f"tg{SPEED_GENERATE}_ts")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def line_of(record: dict[str, Any]) -> str:
    """The plot line a file belongs to: llama.cpp's i-, K- and legacy quants, our group sizes."""
    if record["family"] == "slim2gguf":
        recipe = Recipe.parse(record["type"])
        if recipe.bpw is not None:
            return f"slim2gguf --bpw{' --format native' if recipe.native_budget else ''} ({recipe.sensitivity})"
        order = ", act-order" if recipe.act_order else ""
        if recipe.native is not None:
            return f"slim2gguf --format native ({recipe.method}{order})"
        return f"slim2gguf {recipe.method} g{recipe.group_size}{order}"
    name = record["type"]
    if name.startswith("IQ"):
        return "llama.cpp i-quants"
    return "llama.cpp K-quants" if "_K" in name else "llama.cpp legacy (Q4_0, Q8_0)"


def plot(records: list[dict[str, Any]], path: Path, title: str, x: str) -> None:
    """Mean KL divergence to F16 (log) against bits per weight, one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["name"] != REFERENCE and r["kld_mean"] > 0:
            lines.setdefault(line_of(r), []).append(r)
    for label, points in sorted(lines.items()):
        points.sort(key=lambda r: r[x])
        ours = label.startswith("slim2gguf")
        ax.plot([r[x] for r in points], [r["kld_mean"] for r in points], marker="*" if ours else "o",
                ms=10 if ours else 6, lw=2 if ours else 1, label=label)  # fmt: skip
        for r in points:
            ax.annotate(r["name"], (r[x], r["kld_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)" if x == "bpw_file" else "bits per weight (quantized tensors)")
    ax.set_ylabel("mean KL divergence to F16 (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    save_png(fig, path)


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="named model (smollm2-135m, qwen2.5-coder-1.5b) or a model directory")
    ap.add_argument("--tensors", help=f"tensor-level mode: quantize only these classes ({', '.join(TENSOR_CLASSES)})")
    ap.add_argument("--chunks", type=int, help="llama-perplexity windows (default 40; --quick 4)")
    ap.add_argument("--quick", action="store_true", help="demo model, ffn_down, 3 llama.cpp types and slim2-g64, 4 chunks")
    ap.add_argument("--json", help="write the records (a list, one per file) here")
    ap.add_argument("--types", help="comma-separated llama.cpp types (default: all of the mode)")
    ap.add_argument("--ours", help="comma-separated recipes like slim3-g64 or bpw3.1[-hessian][-native] (default: every uniform budget that fits)")
    ap.add_argument("--calib", default=str(SHARED / "wikitext-2" / "valid.txt"), help="calibration text (both sides)")
    ap.add_argument("--calib-chunks", type=int, help="calibration windows of --ctx tokens (default 32; --quick 8)")
    ap.add_argument("--text", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"), help="eval text (CRLF -> LF)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="our calibration windows")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", help="files, logs and results (default: a folder per model in slim2gguf's cache)")
    ap.add_argument("--plot", help="PNG to write (default: results folder in --work)")
    ap.add_argument("--speed", type=int, default=0, metavar="ROUNDS", help="also llama-bench pp512/tg128 every file, side by side, ROUNDS rounds (median)")
    args = ap.parse_args(argv)
    defaults = {"model": "smollm2-135m", "chunks": 40, "calib_chunks": 32}
    for key, value in (QUICK if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from slim2gguf.models import ModelError, block_linear_shapes, resolve_model

    for what, path in (("evaluation text", args.text), ("calibration text", args.calib)):
        if not Path(path).is_file():
            raise BenchError(f"{what} {path} not found; pass --{'text' if what[0] == 'e' else 'calib'}")
    try:
        args.tensor_classes = parse_tensor_classes(args.tensors) if args.tensors else None
        model_dir = resolve_model(args.model)
    except (ValueError, ModelError) as err:
        raise BenchError(str(err)) from None
    named = find_named(args.model)
    label = named.name if named else model_dir.name
    mode = f"tensors-{'+'.join(args.tensor_classes)}" if args.tensor_classes else "model"
    work = Path(args.work).expanduser() if args.work else cache_dir() / "frontier" / label
    work.mkdir(parents=True, exist_ok=True)
    src = ensure_source()
    jobs = plan(args, work, block_linear_shapes(model_dir))
    text = lf_text(Path(args.text), work)
    f16 = convert_f16(work, src, model_dir)
    logits = work / f"f16-logits-c{args.chunks}x{args.ctx}-{Path(args.text).name}.kld"
    imatrix = None
    if any(job.family == "llama.cpp" and not job.path.exists() for job in jobs):
        imatrix = make_imatrix(work, f16, Path(args.calib), args.calib_chunks, args.ctx, args.threads)
    records, skipped, measured = [], [], []
    for i, job in enumerate(jobs, 1):
        console.rule(f"{i}/{len(jobs)} {job.name} ({job.path.name})")
        try:
            cost = make(job, args, work, f16, imatrix)
            record = measure(job, args, work, src, text, logits, cost)
        except Unavailable as err:
            console.print(f"[yellow]skipped:[/yellow] {err}")
            skipped.append(str(err))
            continue
        records.append(record)
        measured.append((job, record))
        console.print(
            f"  bpw {record['bpw_file']:.3f} file / {record['bpw_blocks']:.3f} blocks, PPL {record['ppl']:.3f}, "
            f"KLD {record['kld_mean']:.4f} (p99 {record['kld_p99']:.3f}), same top {record['same_top_pct']:.2f}%"
        )
    if args.speed:
        measure_speed(measured, args.speed, args.threads, work)
    x = "bpw_blocks" if args.tensor_classes else "bpw_file"
    what = f"only {', '.join(args.tensor_classes)} quantized, every other tensor F16" if args.tensor_classes else "whole model"
    header = (
        f"{named.title if named else label}, {what}; llama-perplexity --kl-divergence on {Path(args.text).name} (LF), "
        f"ctx {args.ctx}, {args.chunks} chunks, {args.threads} threads, {platform.machine()}; llama.cpp "
        f"{PINNED_COMMIT[:10]} + patches (build {build_key()}); calibration {args.calib_chunks}×{args.ctx} "
        f"tokens of {Path(args.calib).name} (llama-imatrix: the first windows; slim2gguf: seeded random windows, seed {args.seed})."
    )
    if args.speed:
        header += f" Speed: llama-bench pp{SPEED_PROMPT} and tg{SPEED_GENERATE}, {args.threads} threads, median of {args.speed} rounds over all files."
    if named:
        header += f" Caveat: {named.note}."
    table = markdown(records, header, x) + "".join(f"\n\nnot measured: {reason}" for reason in skipped)
    write_bytes_atomic(work / f"results-{mode}-c{args.chunks}.md", (table + "\n").encode())
    if args.json:
        write_bytes_atomic(Path(args.json), json.dumps(records, indent=1).encode())
    plot_path = Path(args.plot) if args.plot else work / f"frontier-{mode}-c{args.chunks}.png"
    plot(records, plot_path, f"{named.title if named else label}: {what}, {args.chunks}×{args.ctx} tokens", x)
    print(table)
    console.print(f"table: {work / f'results-{mode}-c{args.chunks}.md'}\nplot: {plot_path}")
    return records


def main() -> None:
    try:
        run(parse_args())
    except (BenchError, LlamaCppError, LlamaToolError) as err:
        console.print(f"[red]error:[/red] {err}")
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished files and results are kept; rerun to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
