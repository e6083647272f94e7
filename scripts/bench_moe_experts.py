"""Rarely routed experts: SliM with and without moe.top_up, side by side.

Why: an expert's Hessian comes from the tokens its router sends it; with few calibration
tokens per expert it has low rank and GPTQ fits the expert to a handful of tokens.
``moe.top_up`` gives every expert linear at least as many tokens' worth of curvature as
it has inputs (routed tokens first, then the average over all calibration tokens). This
measures what that buys against Hessians from routed tokens alone (an expert no token
reaches still gets the all-token average: there is nothing else): the KL divergence to the
float model on WikiText-2 test, for a
random-weight Qwen 2 MoE model (no real MoE model is reachable offline) calibrated on
WikiText-2 valid with few and with more tokens per expert.

    python scripts/bench_moe_experts.py --tokens 1024,8192 --json /tmp/moe-experts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim2gguf import moe  # noqa: E402
from slim2gguf.checkpoint import Checkpoint  # noqa: E402
from slim2gguf.methods import QuantSettings  # noqa: E402
from slim2gguf.models import load_model, load_tokenizer, set_linear_weights  # noqa: E402
from slim2gguf.named_models import demo_model_dir  # noqa: E402
from slim2gguf.perplexity import perplexity  # noqa: E402
from slim2gguf.pipeline import CalibSettings, quantize_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CALIB, TEST = DATA / "wikitext-2" / "valid.txt", DATA / "wikitext-2-raw" / "wiki.test.raw"
SEQLEN = 128


def build_model(target: Path, experts: int, seed: int) -> Path:
    """A random-weight Qwen 2 MoE model with the demo model's tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2_moe", architectures=["Qwen2MoeForCausalLM"], hidden_size=256, intermediate_size=512,
        moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=experts, num_experts_per_tok=2,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    demo = demo_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo / name).exists():
            shutil.copy(demo / name, target / name)
    return target


@torch.no_grad()
def expert_errors(model_dir: Path, quantized: dict[str, torch.Tensor], text: str, chunks: int) -> dict[str, float]:
    """Each expert's relative output error ||E_q(x) - E(x)||^2 / ||E(x)||^2 on the held-out
    tokens the float model routes to it ("block.expert")."""
    import copy

    model = load_model(model_dir)
    windows = torch.tensor(load_tokenizer(model_dir)(text)["input_ids"][: chunks * SEQLEN]).view(-1, SEQLEN)
    routed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = [layer.mlp.experts.register_forward_pre_hook(lambda _m, a, b=b: routed.setdefault(b, []).append((a[0], a[1])))
             for b, layer in enumerate(model.model.layers)]  # fmt: skip
    model(windows, use_cache=False)
    for h in hooks:
        h.remove()
    errors = {}
    for b, layer in enumerate(model.model.layers):
        x, idx = torch.cat([r[0] for r in routed[b]]), torch.cat([r[1] for r in routed[b]])
        for e, expert in enumerate(layer.mlp.experts):
            mine = x[(idx == e).any(-1)]
            if not len(mine):
                continue
            q = copy.deepcopy(expert)
            for n in expert.names:
                getattr(q, n).weight.data = quantized[f"model.layers.{b}.mlp.experts.{e}.{n}"]
            ref = expert(mine)
            errors[f"{b}.{e}"] = float((q(mine) - ref).pow(2).sum() / ref.pow(2).sum())
    return errors


def run(model_dir: Path, tokens: int, top_up: bool, work: Path, args: argparse.Namespace) -> dict:
    out = work / f"ckpt-{tokens}-{'topup' if top_up else 'routed'}"
    settings = QuantSettings("slim", args.bits, 32)
    calib = CalibSettings(str(CALIB), nsamples=tokens // SEQLEN, seqlen=SEQLEN, seed=0)
    started = time.perf_counter()
    with mock.patch.object(moe, "min_tokens", moe.min_tokens if top_up else (lambda _lin: 1)):
        quantize_model(str(model_dir), out, settings, calib)
    wall = time.perf_counter() - started
    ckpt = Checkpoint(out)
    topped = [n for block in ckpt.manifest["blocks"] for n in block.get("experts_topped_up", {})]  # routed-only: dead ones
    model, reference = load_model(model_dir), load_model(model_dir)
    weights = {n: qt.dequantize() for n, qt in ckpt.tensors()}
    set_linear_weights(model, weights)
    text = TEST.read_text()
    result = perplexity(model, load_tokenizer(model_dir), text, ctx=SEQLEN, chunks=args.chunks, reference=reference)
    rare = {f"{b['block']}.{n.split('.')[-2]}" for b in ckpt.manifest["blocks"] for n in b.get("experts_topped_up", {})}
    return {"calib_tokens": tokens, "top_up": top_up, "kld": result.kld, "ppl": result.ppl,
            "expert_linears_topped_up": len(topped), "rare_experts": sorted(rare), "quant_s": round(wall, 1),
            "expert_errors": expert_errors(model_dir, weights, text, args.chunks)}  # fmt: skip


def mean(errors: dict[str, float], keys: list[str]) -> float:
    return sum(errors[k] for k in keys) / max(len(keys), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1024,8192", help="calibration token counts (multiples of 128)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=64, help="evaluation windows of 128 tokens")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (CALIB.is_file() and TEST.is_file()):
        sys.exit(f"error: needs WikiText-2 (valid and test) under {DATA}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model", args.experts, seed=0)
        for tokens in (int(t) for t in args.tokens.split(",")):
            for top_up in (False, True):
                row = run(model_dir, tokens, top_up, work, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| calibration tokens | top-up | expert linears topped up | KLD to float | PPL | "
          "output error, experts topped up | output error, the others |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        rare = next(x["rare_experts"] for x in rows if x["calib_tokens"] == r["calib_tokens"] and x["top_up"])
        errs = r["expert_errors"]
        others = [k for k in errs if k not in rare]
        print(f"| {r['calib_tokens']} | {'yes' if r['top_up'] else 'no'} | {r['expert_linears_topped_up']} | {r['kld']:.6f} | "
              f"{r['ppl']:.1f} | {mean(errs, [k for k in rare if k in errs]):.5f} ({len(rare)}) | {mean(errs, others):.5f} ({len(others)}) |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
