"""llama-bench of GGUF files under several llama.cpp builds, side by side.

Each round runs every (build, file) pair once in turn (llama-bench pp and tg, ``-r 1``), so
a slow spell of a shared machine hits all pairs alike; the table gives each pair's median
over the rounds. Made to compare a patch change with the build before it (the cache keeps
one build folder per patch series: ``~/.cache/slim2gguf/llama.cpp/build-*/build/bin``) or
the patched build with the unpatched one on the same files.

    python scripts/bench_builds.py --build before=OLD/bin --build after=NEW/bin \\
        --file slim4-g128=a.gguf --file iq4_xs=b.gguf --rounds 5 --json speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import parse_bench  # noqa: E402  (llama-bench's JSON, as the other harnesses read it)


def named_paths(items: list[str], what: str) -> dict[str, Path]:
    """NAME=PATH arguments, each PATH checked to exist."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            sys.exit(f"error: --{what} {item!r}: expected NAME=PATH")
        if not Path(path).exists():
            sys.exit(f"error: --{what} {name}: {path} does not exist")
        out[name] = Path(path)
    return out


def bench(bin_dir: Path, model: Path, prompt: int, generate: int, threads: int) -> dict[str, float]:
    """One llama-bench run: tokens per second by test name (pp512, tg128)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(prompt), "-n", str(generate), "-t", str(threads), "-r", "1", "-o", "json"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return {test: value["ts"] for test, value in parse_bench(result.stdout).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="append", required=True, metavar="NAME=BIN_DIR", help="a llama.cpp bin/ folder (repeatable)")
    ap.add_argument("--file", action="append", required=True, metavar="NAME=GGUF", help="a model file (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--generate", type=int, default=128)
    ap.add_argument("--json", type=Path, help="write every sample and the medians here")
    args = ap.parse_args()
    builds, files = named_paths(args.build, "build"), named_paths(args.file, "file")

    samples: dict[tuple[str, str, str], list[float]] = {}
    for i in range(args.rounds):
        for b, bin_dir in builds.items():
            for f, model in files.items():
                for test, ts in bench(bin_dir, model, args.prompt, args.generate, args.threads).items():
                    samples.setdefault((b, f, test), []).append(ts)
                    print(f"round {i + 1}/{args.rounds} {b} {f} {test}: {ts:.2f} t/s", file=sys.stderr, flush=True)

    tests = sorted({t for _, _, t in samples})
    print(f"| build | file | {' | '.join(f'{t} t/s (median)' for t in tests)} |")
    print(f"|---|---|{'---|' * len(tests)}")
    for b in builds:
        for f in files:
            print(f"| {b} | {f} | {' | '.join(f'{statistics.median(samples[b, f, t]):.2f}' for t in tests)} |")
    if args.json:
        rows = [{"build": b, "file": f, "test": t, "samples": v, "median": statistics.median(v)} for (b, f, t), v in samples.items()]
        meta = {"machine": platform.machine(), "threads": args.threads, "rounds": args.rounds, "builds": {k: str(v) for k, v in builds.items()}}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
