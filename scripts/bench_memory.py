"""Host memory in depth: peak RSS of `slim2gguf quantize` and `convert` on synthetic wide
models that differ only in their number of blocks.

Why: a model larger than the host's memory can be quantized only if peak memory does not
grow with depth (issue 16): the pipeline reads the token embedding, then one decoder block
at a time from the safetensors shards (text_model.BlockLoader). The models are LLaMA-layout
checkpoints with random bf16 weights in several shards, built offline with the demo
model's tokenizer; each command runs under `/usr/bin/time -v`, whose "Maximum resident set
size" is the largest process of the command (the export child included).

    python scripts/bench_memory.py                                    # hidden 2048, FFN 8192, 4 and 16 blocks
    python scripts/bench_memory.py --hidden 4096 --ffn 14336 --methods rtn
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slim2gguf.paths import cache_dir  # noqa: E402

SHARED_CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def synthetic_model(root: Path, hidden: int, ffn: int, blocks: int) -> Path:
    """A LLaMA-layout checkpoint with random bf16 weights, about 1 GB per shard (cached)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slim2gguf.named_models import demo_model_dir

    target = root / f"llama-h{hidden}-f{ffn}-b{blocks}"
    if (target / "config.json").is_file():
        return target
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=blocks, num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 512, head_dim=128, vocab_size=49152, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        model.save_pretrained(tmp, max_shard_size="1GB")
        for name in TOKENIZER_FILES:
            shutil.copy(demo_model_dir() / name, Path(tmp) / name)
        Path(tmp).rename(target)
    return target


def measure(cmd: list[str]) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of ``cmd`` under /usr/bin/time -v."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return int(RSS.search(result.stderr).group(1)) / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--blocks", default="4,16", help="depths to compare")
    parser.add_argument("--methods", default="rtn,slim", help="rtn, gptq, slim")
    parser.add_argument("--commands", default="quantize,convert")
    parser.add_argument("--calib", type=Path, default=SHARED_CALIB, help="calibration text (a file: --calib self loads the whole model)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-memory")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.methods != "rtn" and not args.calib.is_file():
        raise SystemExit(f"no calibration text at {args.calib}: give --calib FILE")
    args.work.mkdir(parents=True, exist_ok=True)
    records = []
    for blocks in (int(b) for b in args.blocks.split(",")):
        model = synthetic_model(args.work, args.hidden, args.ffn, blocks)
        size_mib = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        for method in args.methods.split(","):
            for command in args.commands.split(","):
                out = args.work / f"out-b{blocks}-{method}-{command}"
                subprocess.run(["rm", "-rf", str(out), str(out) + ".gguf"], check=True)
                cmd = [sys.executable, "-m", "slim2gguf", command, str(model), "-o", str(out) + (".gguf" if command == "convert" else ""),
                       "--method", method, "--bits", "4", "--group-size", "128", "--nsamples", str(args.nsamples),
                       "--seqlen", str(args.seqlen)]  # fmt: skip
                if method != "rtn":
                    cmd += ["--calib", str(args.calib)]
                rss, wall = measure(cmd)
                record = {"hidden": args.hidden, "ffn": args.ffn, "blocks": blocks, "shards_mib": round(size_mib),
                          "method": method, "command": command, "peak_rss_mib": round(rss), "wall_s": round(wall, 1)}  # fmt: skip
                records.append(record)
                print(json.dumps(record), flush=True)
    print("\n| blocks | bf16 shards MiB | method | command | peak RSS MiB | wall s |\n|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['blocks']} | {r['shards_mib']} | {r['method']} | {r['command']} | {r['peak_rss_mib']} | {r['wall_s']} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
