"""llama.cpp's own quantization types against slim2gguf's files on the demo model, all
measured by the same patched llama.cpp on the same text: file size, bits per weight,
perplexity, KL divergence to F16, and llama-bench prompt/generation speed.

Why: the question SliM has to answer in llama.cpp is quality per bit against the types
people already use. Every file stores its token embedding (and an untied LM head) in
q8_0, so only the block weights differ. llama.cpp's files are made by llama-quantize
from the pinned upstream converter's F16 file, with an importance matrix from
llama-imatrix for the low-bit types; ours are exported from scripts/bench_quant.py's
checkpoints. Every step's result is saved in the work folder; reruns skip what is done.

    python scripts/bench_llamacpp.py                     # the full run (~30-60 min on 2 cores)
    python scripts/bench_llamacpp.py --chunks 2 --only F16,Q4_0,slim4 --skip-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from slim2gguf import format as fmt
from slim2gguf.atomic import atomic_path, write_bytes_atomic
from slim2gguf.checkpoint import Checkpoint, CheckpointError
from slim2gguf.llamacpp import LlamaCppError, build_key, ensure_source
from slim2gguf.run import LlamaToolError, log_tail, run_tool
from slim2gguf.validate import parse_llama_perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import lf_text  # noqa: E402  (the eval text exactly as the PyTorch benchmark reads it)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CACHE = Path.home() / ".cache" / "slim2gguf"

LLAMA_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL", "Q2_0", "Q1_0")
IMATRIX_TYPES = ("Q4_0", "Q4_1", "IQ4_NL", "Q2_0", "Q1_0")  # llama-quantize gets the imatrix for these
# ...but at the pinned commit only these quantizers read it (ggml-quants.c: quantize_q2_0 and
# quantize_q1_0 take quant_weights and ignore them)
IMATRIX_USED = ("Q4_0", "Q4_1", "IQ4_NL")
OUR_CONFIGS = "rtn2,gptq2,slim2,rtn3,gptq3,slim3,rtn4,gptq4,slim4"
DEFAULT_CKPT_KEY = "g64-n64x512-s0-c20x512-valid.txt"
REFERENCE = "F16"
PP_TOKENS, TG_TOKENS = 512, 128

console = Console(stderr=True, highlight=False)


class BenchError(RuntimeError):
    """A missing input or a failed step; the message says which and what to do."""


class Unavailable(BenchError):
    """llama-quantize cannot make this type for this model; the run goes on without it."""


@dataclass
class Entry:
    """One GGUF file to measure and how it is made."""

    label: str
    method: str  # "llama.cpp", or the slim2gguf method (rtn, gptq, slim)
    path: Path
    expected: str  # the type its block weights are meant to have
    calibration: str  # what data shaped the weights, for the table
    checkpoint: Path | None = None


# --- parsing (pure) ----------------------------------------------------------------------

_NUMBER = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf|nan))"
_MEAN_PPL_Q = re.compile(r"Mean PPL\(Q\)\s*:\s*" + _NUMBER)
_MEAN_KLD = re.compile(r"Mean\s+KLD:\s*" + _NUMBER)
_NO_FALLBACK = re.compile(r"no tensor type fallback is defined for type (\S+)")
_NOT_DIVISIBLE = re.compile(r"ncols\s+(\d+) not divisible by\s+(\d+)")


_KLD_STATS = (  # what a ``llama-perplexity --kl-divergence`` run reports, by record key
    ("ppl", _MEAN_PPL_Q),
    ("kld_mean", _MEAN_KLD),
    ("kld_p99", re.compile(r"99\.0%\s+KLD:\s*" + _NUMBER)),
    ("same_top_pct", re.compile(r"Same top p:\s*" + _NUMBER)),
)


def parse_kld_stats(log: str) -> dict[str, float]:
    """PPL, mean and 99th-percentile KL divergence and same-top-token % from a
    ``llama-perplexity --kl-divergence`` log.

    That run scores the same tokens as a plain perplexity run, so its "Mean PPL(Q)" is the
    file's perplexity and one run gives every number."""
    found = {key: rx.search(log) for key, rx in _KLD_STATS}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        raise LlamaToolError(f"no {', '.join(missing)} in the llama-perplexity log:\n{log_tail(log)}")
    return {key: float(match.group(1)) for key, match in found.items()}


def quantize_refusal(log: str) -> str | None:
    """Why llama-quantize refused a type for this model (a row length its blocks do not divide
    and no fallback type, e.g. Q1_0's 128-blocks on 576-wide rows), or None for other failures."""
    refused = _NO_FALLBACK.search(log)
    if refused is None:
        return None
    rows = _NOT_DIVISIBLE.search(log)
    where = f"rows of {rows[1]} weights are not a multiple of its {rows[2]}-weight blocks and " if rows else ""
    return f"{where}llama.cpp has no fallback type for {refused[1]}"


def parse_bench(stdout: str) -> dict[str, dict[str, float]]:
    """``llama-bench -o json`` output -> {"pp512": {"ts": tokens/s, "sd": stddev}, "tg128": ...}."""
    tests = {}
    for rec in json.loads(stdout):
        n_prompt, n_gen = rec["n_prompt"], rec["n_gen"]
        name = f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}" if n_prompt == 0 else f"pp{n_prompt}+tg{n_gen}"
        tests[name] = {"ts": float(rec["avg_ts"]), "sd": float(rec["stddev_ts"])}
    return tests


def is_block_weight(row: dict[str, Any]) -> bool:
    """A 2-D tensor of a decoder block: what differs between the files compared here."""
    return row["name"].startswith("blk.") and len(row["shape"]) == 2


def summarize_tensors(rows: list[dict[str, Any]], expected: str) -> dict[str, Any]:
    """Sizes, bits per weight (all tensors; block weights only), type counts, and the block
    weights not stored as ``expected`` (llama-quantize falls back silently)."""
    blocks = [r for r in rows if is_block_weight(r)]
    total_bytes = sum(r["bytes"] for r in rows)
    block_bytes = sum(r["bytes"] for r in blocks)
    return {
        "tensor_bytes": total_bytes,
        "file_bpw": 8 * total_bytes / sum(r["params"] for r in rows),
        "block_bpw": 8 * block_bytes / sum(r["params"] for r in blocks),
        "types": dict(Counter(r["type"] for r in rows).most_common()),
        "fallbacks": {r["name"]: r["type"] for r in blocks if r["type"] != expected},
    }


def fallback_summary(fallbacks: dict[str, str]) -> str:
    """{'blk.3.ffn_down.weight': 'Q8_0', ...} -> 'Q8_0: ffn_down.weight×30' (per type, per tensor kind)."""
    by_type: dict[str, Counter] = {}
    for name, type_name in fallbacks.items():
        kind = name.split(".", 2)[2] if name.count(".") >= 2 else name
        by_type.setdefault(type_name, Counter())[kind] += 1
    parts = [f"{t}: " + ", ".join(f"{k}×{n}" for k, n in sorted(kinds.items())) for t, kinds in sorted(by_type.items())]
    return "; ".join(parts)


def eval_key(text: Path, ctx: int, chunks: int) -> str:
    """What a saved measurement depends on besides the file itself."""
    return f"c{chunks}x{ctx}-{text.name}"


# --- running the tools -------------------------------------------------------------------


def timed_tool(
    name: str, args: Sequence[str | os.PathLike | int], what: str, log: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    """A patched llama.cpp tool under a status line; its output is kept in ``log``."""
    t0 = time.perf_counter()
    command = f"$ {name} {' '.join(map(str, args))}\n"
    log.parent.mkdir(parents=True, exist_ok=True)
    with console.status(f"{what}…"):
        try:
            result = run_tool(name, args)
        except LlamaToolError as err:
            log.write_text(command + str(err))
            raise BenchError(f"{what} (log: {log}): {err}") from None
    seconds = time.perf_counter() - t0
    log.write_text(command + result.stdout + "\n" + result.stderr)
    console.print(f"  {what}: {seconds:.0f} s")
    return result, seconds


def convert_f16(work: Path, src: Path, model_dir: Path) -> Path:
    """The model as F16 by the pinned upstream converter (run with its own gguf-py)."""
    out = work / "convert-f16.gguf"
    if out.exists():
        return out
    paths = [str(src / "gguf-py"), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
    t0 = time.perf_counter()
    with atomic_path(out) as tmp, console.status(f"converting {model_dir.name} to F16 (upstream converter)…"):
        cmd = [sys.executable, src / "convert_hf_to_gguf.py", model_dir, "--outtype", "f16", "--outfile", tmp]
        cmd = [str(c) for c in cmd]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace")
        (work / "logs").mkdir(exist_ok=True)
        (work / "logs" / "convert-f16.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise BenchError(f"convert_hf_to_gguf.py failed (exit {result.returncode}):\n{log_tail(result.stderr)}")
    console.print(f"  upstream F16 conversion: {time.perf_counter() - t0:.0f} s")
    return out


def make_imatrix(work: Path, f16: Path, calib: Path, chunks: int, ctx: int, threads: int) -> Path:
    """llama-imatrix over the first ``chunks`` windows of the calibration text (cached)."""
    out = work / f"imatrix-{calib.stem}-{chunks}x{ctx}.gguf"
    if out.exists():
        return out
    if not calib.is_file():
        raise BenchError(f"calibration text {calib} not found (needed for llama-imatrix); pass --calib")
    text = lf_text(calib, work)
    with atomic_path(out) as tmp:
        args = ["-m", f16, "-f", text, "-o", tmp, "--output-format", "gguf"]
        args += ["-c", ctx, "--chunks", chunks, "-t", threads, "--no-ppl"]
        what = f"llama-imatrix on {chunks}×{ctx} tokens of {calib.name}"
        timed_tool("llama-imatrix", args, what, work / "logs" / f"{out.stem}.log")
    return out


def inspect_file(path: Path, src: Path) -> list[dict[str, Any]]:
    """slim2gguf.inspect_gguf.inspect_rows, run with the llama.cpp tree's gguf-py: PyPI gguf
    0.19 does not know Q2_0 (id 42), and one unknown type makes a whole file unreadable."""
    code = "import json, sys; from slim2gguf.inspect_gguf import inspect_rows as r; print(json.dumps(r(sys.argv[1])))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(ROOT)]))
    result = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"could not read {path}:\n{log_tail(result.stderr)}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the plan ----------------------------------------------------------------------------


def plan(args: argparse.Namespace, work: Path) -> list[Entry]:
    """The files to measure, F16 (the reference) first; our configs without a checkpoint are skipped."""
    configs = [c for c in args.configs.split(",") if c]
    known = list(LLAMA_TYPES) + configs
    only = [x for x in args.only.split(",") if x] if args.only else known
    unknown = sorted(set(only) - set(known))
    if unknown:
        raise BenchError(f"--only names unknown files {', '.join(unknown)}; choose from {', '.join(known)}")
    if REFERENCE not in only:
        console.print(f"{REFERENCE} is measured too: it is the reference for the ratio and the KL divergence")
    imatrix_name = f"{Path(args.calib).stem}-{args.imatrix_chunks}x{args.ctx}"
    entries = []
    for t in (t for t in LLAMA_TYPES if t == REFERENCE or t in only):
        if t in IMATRIX_TYPES:
            path = work / f"{t}-imatrix-{imatrix_name}.gguf"
            used = "" if t in IMATRIX_USED else " (ignored by the quantizer)"
            calibration = f"imatrix {args.imatrix_chunks}×{args.ctx} {Path(args.calib).name}{used}"
        else:
            path, calibration = work / f"{t}.gguf", "none"
        entries.append(Entry(t, "llama.cpp", path, t, calibration))
    for config in (c for c in configs if c in only):
        ckpt = Path(args.ckpt_dir).expanduser() / f"ckpt-{config}-{args.ckpt_key}"
        try:
            settings = Checkpoint(ckpt).settings
        except CheckpointError as err:
            hint = "make it with scripts/bench_quant.py, or pass --ckpt-key / --ckpt-dir"
            console.print(f"[yellow]skipping {config}:[/yellow] {err} ({hint})")
            continue
        calib = settings.get("calibration") or {}
        calibration = f"{calib.get('nsamples')}×{calib.get('seqlen')} {Path(str(calib.get('source'))).name}"
        if settings["method"] == "rtn":
            calibration = "none"
        stype = fmt.slim_type(int(settings["bits"]), int(settings["group_size"]))
        path = work / f"{config}-{args.ckpt_key}.gguf"
        entries.append(Entry(config, settings["method"], path, stype.name, calibration, ckpt))
    return entries


def make_file(entry: Entry, args: argparse.Namespace, work: Path, src: Path) -> float | None:
    """Write ``entry.path`` unless it exists; the seconds it took, or None when it was there."""
    if entry.path.exists():
        return None
    t0 = time.perf_counter()
    if entry.checkpoint is not None:
        from slim2gguf.export import ExportError, export_gguf

        with console.status(f"exporting {entry.checkpoint.name}…"):
            try:
                export_gguf(entry.checkpoint, entry.path, embed_type="q8_0", output_type="q8_0", progress=False)
            except ExportError as err:
                raise BenchError(f"exporting {entry.checkpoint} failed: {err}") from None
        seconds = time.perf_counter() - t0
        console.print(f"  export {entry.label}: {seconds:.0f} s")
        return seconds
    from slim2gguf.named_models import demo_model_dir

    f16 = convert_f16(work, src, demo_model_dir())
    opts: list[str | os.PathLike | int] = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
    if entry.label in IMATRIX_TYPES:
        opts += ["--imatrix", make_imatrix(work, f16, Path(args.calib), args.imatrix_chunks, args.ctx, args.threads)]
    log = work / "logs" / f"{entry.path.stem}.quantize.log"
    try:
        with atomic_path(entry.path) as tmp:
            what = f"llama-quantize {entry.label}"
            _, seconds = timed_tool("llama-quantize", [*opts, f16, tmp, entry.label, args.threads], what, log)
    except BenchError as err:
        reason = quantize_refusal(str(err))
        if reason is None:
            raise
        raise Unavailable(f"llama-quantize cannot make {entry.label} for this model: {reason}") from None
    return seconds


def result_path(work: Path, entry: Entry, key: str) -> Path:
    return work / "results" / f"{entry.path.stem}-{key}.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _save(path: Path, result: dict[str, Any]) -> None:
    result["build"] = build_key()  # the llama.cpp build (patches) of every measurement in it
    write_bytes_atomic(path, json.dumps(result, indent=1).encode())


def measure(
    entry: Entry, args: argparse.Namespace, work: Path, src: Path, text: Path, key: str, logits: Path | None
) -> dict[str, Any]:
    """Every measurement of one file, reusing those saved for the same file, llama.cpp build
    (patches) and ``key`` (text, ctx, chunks). ``logits`` is the F16 log-probabilities file
    for KL divergence (None: --skip-kld); the F16 run writes it."""
    made_s = make_file(entry, args, work, src)
    saved = result_path(work, entry, key)
    res: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    if res.get("stamp") != _stamp(entry.path) or res.get("build") != build_key():  # new, rebuilt, or other kernels
        res = {
            "label": entry.label, "method": entry.method, "file": str(entry.path), "stamp": _stamp(entry.path),
            "file_mib": entry.path.stat().st_size / 2**20, "calibration": entry.calibration, "make_s": made_s,
            **summarize_tensors(inspect_file(entry.path, src), entry.expected),
        }  # fmt: skip
        _save(saved, res)
    logs = work / "logs"
    base = ["-m", entry.path, "-f", text, "-c", args.ctx, "--chunks", args.chunks, "-t", args.threads]
    if entry.label == REFERENCE and logits is not None and not logits.exists():
        with atomic_path(logits) as tmp:
            what = f"{entry.label}: perplexity, saving its logits for KLD"
            ppl_log = logs / f"{entry.path.stem}-{key}.ppl.log"
            result, seconds = timed_tool("llama-perplexity", [*base, "--kl-divergence-base", tmp], what, ppl_log)
        res.update(ppl=parse_llama_perplexity(result.stdout + result.stderr), kld=0.0, ppl_s=seconds)
        _save(saved, res)
    elif logits is not None and "kld" not in res:
        kld_args = [*base, "--kl-divergence-base", logits, "--kl-divergence"]
        what = f"{entry.label}: perplexity and KLD to F16"
        result, seconds = timed_tool("llama-perplexity", kld_args, what, logs / f"{entry.path.stem}-{key}.kld.log")
        stats = parse_kld_stats(result.stdout + result.stderr)
        res.update(ppl=stats["ppl"], kld=stats["kld_mean"], ppl_s=seconds)
        _save(saved, res)
    elif "ppl" not in res:
        what, ppl_log = f"{entry.label}: perplexity", logs / f"{entry.path.stem}-{key}.ppl.log"
        result, seconds = timed_tool("llama-perplexity", base, what, ppl_log)
        res.update(ppl=parse_llama_perplexity(result.stdout + result.stderr), ppl_s=seconds)
        _save(saved, res)
    return res


def measure_speed(entries: list[Entry], results: list[dict[str, Any]], args: argparse.Namespace, work: Path, key: str) -> None:
    """llama-bench pp512 and tg128 of every file, side by side: each of ``args.rounds`` rounds
    runs every file once in turn, so a slow spell of a shared machine hits all files alike.
    Each result gets the median of its rounds and their range."""
    settings = {"threads": args.threads, "rounds": args.rounds}
    if all({k: r.get("bench", {}).get(k) for k in settings} == settings for r in results):
        return
    samples: dict[str, dict[str, list[float]]] = {r["label"]: {} for r in results}
    for i in range(args.rounds):
        for entry in entries:
            result, _ = timed_tool(
                "llama-bench",
                ["-m", entry.path, "-p", PP_TOKENS, "-n", TG_TOKENS, "-t", args.threads, "-r", 1, "-o", "json"],
                f"round {i + 1}/{args.rounds}, {entry.label}: llama-bench pp{PP_TOKENS} tg{TG_TOKENS}",
                work / "logs" / f"{entry.path.stem}.bench.log",
            )
            for test, measured in parse_bench(result.stdout).items():
                samples[entry.label].setdefault(test, []).append(measured["ts"])
    for entry, res in zip(entries, results, strict=True):
        res["bench"] = {
            **settings,
            **{test: {"ts": statistics.median(v), "lo": min(v), "hi": max(v), "samples": v} for test, v in samples[res["label"]].items()},
        }
        _save(result_path(work, entry, key), res)


# --- reporting ---------------------------------------------------------------------------


def copy_bandwidth(n_bytes: int = 256 << 20) -> float:
    """A rough yardstick for "how far from memory-bound": GB/s a numpy copy moves (read +
    write, one thread, best of three) on this machine."""
    import numpy as np

    a = np.ones(n_bytes // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


def _tg(res: dict[str, Any]) -> float | None:
    return res.get("bench", {}).get(f"tg{TG_TOKENS}", {}).get("ts")


def markdown(results: list[dict[str, Any]], header: str) -> str:
    """The comparison table. Bytes per generated token ≈ all tensor bytes (each weight is
    read once per token; the tied embedding doubles as the LM head)."""
    f16 = next(r for r in results if r["label"] == REFERENCE)
    lines = [
        header,
        "",
        (
            "| file | made by | calibration | MiB | bpw all | bpw blocks | PPL | ×F16 | KLD "
            f"| pp{PP_TOKENS} t/s (range) | tg{TG_TOKENS} t/s (range) | MiB read/token | implied GB/s "
            "| block weights not in the file's type |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        bench = r.get("bench", {})
        pp, tg = bench.get(f"pp{PP_TOKENS}"), bench.get(f"tg{TG_TOKENS}")
        cells = [
            r["label"],
            "llama-quantize" if r["method"] == "llama.cpp" else f"slim2gguf {r['method']}",
            r["calibration"],
            f"{r['file_mib']:.1f}",
            f"{r['file_bpw']:.3f}",
            f"{r['block_bpw']:.3f}",
            f"{r['ppl']:.2f}",
            f"{r['ppl'] / f16['ppl']:.3f}",
            f"{r['kld']:.4f}" if "kld" in r else "",
            f"{pp['ts']:.1f} ({pp['lo']:.0f}–{pp['hi']:.0f})" if pp else "",
            f"{tg['ts']:.1f} ({tg['lo']:.0f}–{tg['hi']:.0f})" if tg else "",
            f"{r['tensor_bytes'] / 2**20:.1f}",
            f"{r['tensor_bytes'] * tg['ts'] / 1e9:.2f}" if tg else "",
            fallback_summary(r["fallbacks"]) or "none",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOT_STYLES = {  # method -> (marker, colour, legend)
    "llama.cpp": ("o", "tab:blue", "llama.cpp (llama-quantize)"),
    "rtn": ("v", "tab:green", "slim2gguf RTN"),
    "gptq": ("s", "tab:orange", "slim2gguf GPTQ"),
    "slim": ("*", "tab:red", "slim2gguf SliM"),
}


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Perplexity and KL divergence to F16 (both log; KLD when measured) against bits per
    block weight, side by side: where the perplexities crowd together (4.5 bpw), the KLDs
    still separate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = [("ppl", "perplexity")] + ([("kld", "KL divergence to F16")] if any("kld" in r for r in results) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6), squeeze=False)
    f16 = next(r for r in results if r["label"] == REFERENCE)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, (metric, name) in zip(axes[0], panels, strict=True):
        if metric == "ppl":
            ax.axhline(f16["ppl"], ls="--", lw=1, color="grey", label=f"F16 (16 bpw): {f16['ppl']:.2f}")
        for method, (marker, colour, legend) in PLOT_STYLES.items():
            points = [r for r in results if r["method"] == method and r["label"] != REFERENCE]
            points = [r for r in points if 0 < r.get(metric, 0) < float("inf")]  # a log axis cannot show the others
            if not points:
                continue
            x, y = [r["block_bpw"] for r in points], [r[metric] for r in points]
            ax.scatter(x, y, marker=marker, color=colour, s=90 if marker == "*" else 50, label=legend, zorder=3)
            for r in points:
                ax.annotate(r["label"], (r["block_bpw"], r[metric]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        if high / low < 10:  # less than a decade has no major tick to read
            ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("bits per weight (quantized block tensors)")
        ax.set_ylabel(f"{name} (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)


def save_png(fig, path: Path) -> None:
    """Write a matplotlib figure (atomically, so a plot is whole or absent) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"), help="eval text (CRLF -> LF)")
    ap.add_argument("--calib", default=str(SHARED / "wikitext-2" / "valid.txt"), help="llama-imatrix text")
    ap.add_argument("--imatrix-chunks", type=int, default=64, help="llama-imatrix windows (as the checkpoints' n64)")
    ap.add_argument("--chunks", type=int, default=20, help="llama-perplexity windows")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="llama-bench rounds over all files (median reported)")
    ap.add_argument("--configs", default=OUR_CONFIGS, help="bench_quant.py configs whose checkpoints to export")
    ap.add_argument("--ckpt-key", default=DEFAULT_CKPT_KEY, help="checkpoint folder is CKPT_DIR/ckpt-<config>-<key>")
    ap.add_argument("--ckpt-dir", default=str(CACHE / "bench"), help="where scripts/bench_quant.py left its checkpoints")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(LLAMA_TYPES)} and the configs")
    ap.add_argument("--skip-bench", action="store_true", help="no llama-bench")
    ap.add_argument("--skip-kld", action="store_true", help="no KL divergence (no F16 logits file, ~25 MB per chunk)")
    ap.add_argument("--work", default=str(CACHE / "bench-llamacpp"), help="files, logs and saved results")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "ppl_vs_bpw.png"), help="PNG to write")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    text_path = Path(args.text)
    if not text_path.is_file():
        raise BenchError(f"evaluation text {text_path} not found; pass --text")
    text = lf_text(text_path, work)
    entries = plan(args, work)
    src = ensure_source()
    key = eval_key(text_path, args.ctx, args.chunks)
    logits = None if args.skip_kld else work / f"f16-logits-{key}.kld"
    results, measured, skipped = [], [], []
    for entry in entries:
        console.rule(f"{entry.label} ({entry.path.name})")
        try:
            res = measure(entry, args, work, src, text, key, logits)
        except Unavailable as err:
            console.print(f"[yellow]skipped:[/yellow] {err}")
            skipped.append(str(err))
            continue
        results.append(res)
        measured.append(entry)
        kld = f", KLD {res['kld']:.4f}" if "kld" in res else ""
        console.print(f"  PPL {res['ppl']:.3f}{kld}")
    if not args.skip_bench:
        console.rule(f"speed: {args.rounds} rounds over {len(measured)} files")
        measure_speed(measured, results, args, work, key)
    header = (
        f"SmolLM2-135M-Instruct; llama-perplexity on {text_path.name} (LF) ctx {args.ctx}, {args.chunks} chunks, "
        f"{args.threads} threads, {platform.machine()}; every file's token embedding in q8_0 (F16 = upstream "
        f"converter's F16, embedding re-stored as q8_0 by llama-quantize). Checkpoints: {args.ckpt_key}. "
        "Caveat: the demo model's weights lie on a Q4_1 grid (blocks of 32), which favours 4-bit types aligned with it."
    )
    table = markdown(results, header)
    table += "".join(f"\n\nnot measured: {reason}" for reason in skipped)
    if any(_tg(r) for r in results):
        table += f"\n\nmemory copy on this machine (numpy, 1 thread, read + write): {copy_bandwidth():.1f} GB/s"
    out = work / f"results-{key}.md"
    write_bytes_atomic(out, (table + "\n").encode())
    title = f"SmolLM2-135M, {text_path.name} ctx {args.ctx} ×{args.chunks} chunks; token embedding q8_0 in every file"
    plot(results, Path(args.plot), title)
    print(table)
    console.print(f"table: {out}\nplot: {args.plot}")


def main() -> None:
    args = parse_args()
    try:
        run(args)
    except (BenchError, LlamaCppError, LlamaToolError) as err:
        console.print(f"[red]error:[/red] {err}")
        sys.exit(1)


if __name__ == "__main__":
    main()
