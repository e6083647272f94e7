"""Does scoring a sample of each linear's rows change what `--bpw --format native` decides?

Why: the sensitivity pass rounds every decoder linear at every stock type, and the
lattice types' grid searches make that hours on a 1.5B model; slim2gguf.sensitivity
scores at most SAMPLE_ROWS rows per linear: the KEEP_ROWS most at stake for themselves,
evenly spaced ones for the rest. This
measures the sample against every row on one model and one calibration: how far the
scores move, and, for budgets across the reachable range, how many tensors the knapsack
sets differently and the regret, the summed full-row score of the sampled decision over
that of the full-row decision (1.000: the same quality by the budget's own measure).

    python scripts/bench_sensitivity_rows.py --model smollm2-135m --budgets 4.5,4.75,5,5.25,5.477,6,7
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim2gguf import sensitivity  # noqa: E402
from slim2gguf.budget import BudgetError, model_shapes, solve  # noqa: E402
from slim2gguf.calib import read_text, windows_from_text  # noqa: E402
from slim2gguf.models import load_model, load_tokenizer, resolve_model  # noqa: E402

WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="4.5,5,5.477,6,7", help="whole-file bits per weight to decide")
    ap.add_argument("--calib", default=str(WIKI_VALID))
    ap.add_argument("--method", default="fisher", choices=sensitivity.SENSITIVITIES)
    ap.add_argument("--tensors", help="budget only these classes (e.g. ffn_down,attn_v), the rest F16: a cheaper check")
    args = ap.parse_args()
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
        text = read_text(args.calib)
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    path = resolve_model(args.model)
    model, tokenizer = load_model(path), load_tokenizer(path)
    windows = windows_from_text(text, tokenizer, sensitivity.WINDOWS, 512, 0)
    shapes = model_shapes(path, tuple(args.tensors.split(",")) if args.tensors else None, native=True)
    console = Console(stderr=True)
    timed, sample = {}, sensitivity.SAMPLE_ROWS
    cut = [n for n, (rows, _) in shapes.linears.items() if rows > sample]  # the linears the sample reads a part of
    if not cut:
        sys.exit(f"error: no linear of {args.model} has more than {sample} rows: nothing is sampled")
    for label, rows in (("sampled", sample), ("full", 1 << 30)):
        sensitivity.SAMPLE_ROWS = rows
        start = time.perf_counter()
        timed[label] = (sensitivity.measure(model, windows, shapes, args.method, torch.device("cpu"), console), time.perf_counter() - start)
    (sampled, t_sampled), (full, t_full) = timed["sampled"], timed["full"]
    moved = [abs(sampled[n][c] / full[n][c] - 1) for n in cut for c in full[n] if full[n][c] > 0]
    print(f"{args.model}, {args.method}, at most {sample} rows per linear against every row:")
    print(f"pass: sampled {t_sampled:.0f} s, every row {t_full:.0f} s (the {args.method} pass over the windows included in both)")
    moved.sort()
    print(f"score change, sampled against every row: median {moved[len(moved) // 2]:.2%}, 90th percentile "
          f"{moved[int(0.9 * len(moved))]:.2%}, max {moved[-1]:.2%} ({len(moved)} scores: {len(cut)} sampled linears × types)")
    print("| budget | tensors set differently | of | regret (full-row score of the sampled decision / optimum) |")
    print("|---|---|---|---|")
    for bpw in budgets:
        try:
            by_sample, by_full = solve(bpw, shapes, sampled), solve(bpw, shapes, full)
        except BudgetError as err:
            print(f"| {bpw:g} | {err} | | |")
            continue
        differ = sum(by_sample.choices[n] != by_full.choices[n] for n in by_full.choices)
        got, best = (sum(full[n][c] for n, c in d.choices.items()) for d in (by_sample, by_full))
        regret = f"{got / best:.4f}" if best > 0 else ("1 (both exact)" if got == 0 else "inf")
        print(f"| {bpw:g} | {differ} | {len(by_full.choices)} | {regret} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
