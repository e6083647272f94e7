"""Quantization benchmark: perplexity, wall time and peak memory of fp32 / RTN / GPTQ /
SliM (and SliM ablations) on one model, side by side in one run.

Each configuration runs in its own process (so peak memory is its own) and its result
is saved as JSON; rerunning skips finished configurations. Example (the run recorded
in docs/BENCHMARKS.md):

    python scripts/bench_quant.py --model smollm2-135m --group-size 64 \\
        --configs fp32,rtn2,gptq2,slim2,rtn3,gptq3,slim3,rtn4,gptq4,slim4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ABLATIONS = {"": {}, "-sba": {"sqc": False}, "-sqc": {"sba": False}, "-plain": {"sba": False, "sqc": False}}


def parse_config(name: str) -> dict:
    """'slim2', 'gptq3', 'slim2-sba' (SBA only), 'slim2-sqc' (SQC only), 'slim2-l1' (λ=1),
    '...-self' (self-generated calibration), 'fp32'."""
    if name == "fp32":
        return {"method": None}
    parts = name.split("-")
    head = parts[0]
    method, bits = head[:-1], int(head[-1])
    cfg: dict = {"method": method, "bits": bits, "calib_self": False}
    for p in parts[1:]:
        if p == "self":
            cfg["calib_self"] = True
        elif p.startswith("l"):
            cfg["sqc_lambda"] = float(p[1:])
        elif p.startswith("t"):
            cfg["sba_tokens"] = int(p[1:])
        else:
            cfg.update(ABLATIONS["-" + p])
    return cfg


def run_key(args: argparse.Namespace) -> str:
    """What a saved result depends on besides its configuration name."""
    return f"g{args.group_size}-n{args.nsamples}x{args.seqlen}-s{args.seed}-c{args.chunks}x{args.ctx}-{Path(args.calib).name}"


def lf_text(path: Path, cache: Path) -> Path:
    """The evaluation text with CRLF turned into LF (what llama.cpp runs are given too)."""
    out = cache / (path.stem + ".lf.txt")
    if not out.exists():
        out.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
    return out


def run_one(args: argparse.Namespace, name: str) -> dict:
    import torch

    from slim2gguf.checkpoint import Checkpoint
    from slim2gguf.methods import QuantSettings
    from slim2gguf.models import load_model, load_tokenizer, resolve_model, set_linear_weights
    from slim2gguf.perplexity import perplexity
    from slim2gguf.pipeline import CalibSettings, quantize_model

    torch.set_num_threads(args.threads)
    cfg = parse_config(name)
    path = resolve_model(args.model)
    result: dict = {"config": name, **cfg}
    model = load_model(path)
    if cfg["method"] is not None:
        settings = {k: cfg[k] for k in ("sba", "sqc", "sqc_lambda", "sba_tokens") if k in cfg}
        quant = QuantSettings(cfg["method"], cfg["bits"], args.group_size, **settings)
        calib = CalibSettings("self" if cfg["calib_self"] else str(args.calib), args.nsamples, args.seqlen, args.seed)
        out = Path(args.work) / f"ckpt-{name}-{run_key(args)}"
        t0 = time.perf_counter()
        report = quantize_model(args.model, out, quant, calib, device=args.device)
        result["quant_wall_s"] = round(time.perf_counter() - t0, 1)
        result["widths"] = dict(sorted((int(k), v) for k, v in report.width_groups.items()))
        set_linear_weights(model, {n: qt.dequantize() for n, qt in Checkpoint(out).tensors()})
    text = lf_text(Path(args.text), Path(args.work)).read_text(encoding="utf-8")
    ppl = perplexity(model, load_tokenizer(path), text, args.ctx, args.chunks, "llama")
    result.update(ppl=ppl.ppl, tokens=ppl.tokens_scored, chunks=ppl.chunks)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"model {args.model}, group {args.group_size}, calibration {Path(args.calib).name} "
        f"{args.nsamples}×{args.seqlen} (seed {args.seed}), eval {Path(args.text).name} (LF) ctx {args.ctx}, "
        f"{args.chunks} chunks, llama-perplexity method; {platform.machine()} {args.threads} threads",
        "",
        "| config | PPL | quant wall s | peak RSS MiB | groups per width |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        widths = " ".join(f"{k}b:{v}" for k, v in r.get("widths", {}).items())
        lines.append(f"| {r['config']} | {r['ppl']:.2f} | {r.get('quant_wall_s', '')} | {r['peak_rss_mib']} | {widths} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--configs", default="fp32,rtn2,gptq2,slim2,rtn3,gptq3,slim3,rtn4,gptq4,slim4")
    ap.add_argument("--text", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--calib", default=str(SHARED / "wikitext-2" / "valid.txt"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "slim2gguf" / "bench"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(run_one(args, args.one)))
        return
    results = []
    for name in args.configs.split(","):
        saved = Path(args.work) / f"result-{name}-{run_key(args)}.json"
        if not saved.exists():
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed (exit {proc.returncode})")
            saved.write_text(proc.stdout.strip().splitlines()[-1])
        results.append(json.loads(saved.read_text()))
        print(f"{name}: ppl {results[-1]['ppl']:.2f}", flush=True)
    print(markdown(results, args))


if __name__ == "__main__":
    main()
