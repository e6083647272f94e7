"""Quantization speed per decoder block (issue 16): the wall time of one block's
calibration forward pass and of its quantization by each method, on the block shapes of
real models (random weights), as the number of calibration tokens grows.

Why synthetic blocks: a block's time depends on its shapes and the token count, not on
its weights' values, and a whole 1.5B conversion costs an hour here where one block costs
minutes. The work timed is the pipeline's own: ``capture_block_inputs`` for the block's
inputs, then ``_quantize_block`` (hooks collecting each linear's Hessian and SBA sample
during the float forward pass, the method's quantizer on each linear, the quantized
block's forward pass that feeds the next block). Loading weights and writing the
checkpoint are not included (bench_memory.py measures whole runs).

    python scripts/bench_speed.py --shapes qwen2.5-1.5b --tokens 4096,16384 --methods rtn,gptq,slim
    python scripts/bench_speed.py --tokens 4096 --methods slim --native iq3_s,q3_k   # stock types
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slim2gguf.methods import QuantSettings  # noqa: E402
from slim2gguf.pipeline import _quantize_block, _run_block, capture_block_inputs, quantized_linears, token_sample  # noqa: E402
from slim2gguf.storage import NATIVE_TYPES  # noqa: E402

# Block shapes of real models: (transformers model type, hidden, FFN, heads, KV heads).
SHAPES = {
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 12, 2),
    "qwen2.5-3b": ("qwen2", 2048, 11008, 16, 2),
    "llama-3-8b": ("llama", 4096, 14336, 32, 8),
}
SEQLEN = 512


def one_block_model(shape: str) -> torch.nn.Module:
    """A float32 causal LM with one decoder block of ``shape`` and random weights (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, hidden, ffn, heads, kv = SHAPES[shape]
    config = AutoConfig.for_model(
        kind, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv,
        num_hidden_layers=1, vocab_size=1024, max_position_embeddings=SEQLEN,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def row_name(row: dict) -> str:
    """'slim3' for a --bits row, 'slim-iq3_s' for a stock type's."""
    return f"{row['method']}-{row['native']}" if "native" in row else f"{row['method']}{row['bits']}"


def time_block(shape: str, tokens: int, methods: list[str], bits: int, native: list[str]) -> list[dict]:
    """Seconds for the block's float forward pass, and per method (and stock type, with
    ``native``: --format native) for quantizing it."""
    model = one_block_model(shape)
    device = torch.device("cpu")
    windows = torch.randint(0, 1024, (tokens // SEQLEN, SEQLEN), generator=torch.Generator().manual_seed(0))
    hidden, kwargs_of = capture_block_inputs(model, windows, device)
    batches = list(zip(hidden, kwargs_of["full_attention"]))
    layer = model.model.layers[0]
    with torch.no_grad():
        started = time.perf_counter()
        _run_block(layer, batches, device)
        forward = time.perf_counter() - started
    rows = []
    for method, stock in ((m, t) for m in methods for t in native or [None]):
        quant = QuantSettings(method, bits, native=stock)
        copy_ = copy.deepcopy(model)
        linears = quantized_linears(copy_, 0, quant)
        sampling = (tokens, token_sample(tokens, quant.sba_tokens, 0))
        with torch.no_grad():
            started = time.perf_counter()
            _quantize_block(0, copy_.model.layers[0], linears, [] if method == "rtn" else batches, quant, (None, None), sampling, device)
            wall = time.perf_counter() - started
        params = sum(lin.weight.numel() for lin in linears.values())
        rows.append({"shape": shape, "tokens": tokens, "method": method, **({"native": stock} if stock else {"bits": bits}),
                     "forward_s": round(forward, 2), "block_s": round(wall, 2), "params": params})  # fmt: skip
        print(f"{shape} {tokens} tokens {row_name(rows[-1])}: block {wall:.1f} s (one float forward pass {forward:.1f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2.5-1.5b", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default="4096,16384", help="calibration tokens (multiples of 512)")
    parser.add_argument("--methods", default="rtn,gptq,slim")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--native", default="", help="comma-separated stock types (--format native) instead of --bits")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    native = [t for t in args.native.lower().split(",") if t]
    wrong = [t for t in native if t not in NATIVE_TYPES]
    if wrong:
        parser.error(f"unknown stock type {wrong[0]!r}; choose from {', '.join(NATIVE_TYPES)}")
    rows = []
    for shape in shapes:
        for tokens in (int(t) for t in args.tokens.split(",")):
            rows += time_block(shape, tokens, args.methods.split(","), args.bits, native)
    print("\n| shape | tokens | method | block s | float forward s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['tokens']} | {row_name(r)} | {r['block_s']} | {r['forward_s']} |")
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
