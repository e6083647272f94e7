"""The pure helpers of scripts/bench_llamacpp.py: parsing llama.cpp's output and summing
tensor sizes. No llama.cpp runs here; the log excerpts are what the pinned tools print."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from slim2gguf.run import LlamaToolError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_llamacpp.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    monkeypatch.undo()


KLD_LOG = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  33.271234 ±   0.912345
Mean PPL(base)                :  26.930000 ±   0.700000
Cor(ln(PPL(Q)), ln(PPL(base))):  97.12%
Mean ln(PPL(Q)/PPL(base))     :   0.211300 ±   0.004000

====== KL divergence statistics ======
Mean    KLD:   0.123456 ±   0.001234
Maximum KLD:  12.345678
"""


def test_parse_kld_run(bench):
    assert bench.parse_kld_run(KLD_LOG) == (33.271234, 0.123456)


def test_parse_kld_run_huge_and_missing(bench):
    ppl, kld = bench.parse_kld_run("Mean PPL(Q)                   : 3783243.123400 ± 1.0\nMean    KLD:   9.5 ± 0.1")
    assert (ppl, kld) == (3783243.1234, 9.5)
    ppl, _ = bench.parse_kld_run("Mean PPL(Q)                   :        inf ± nan\nMean    KLD:   1 ± 0")
    assert math.isinf(ppl)
    with pytest.raises(LlamaToolError, match="Mean PPL"):
        bench.parse_kld_run("Final estimate: PPL = 26.9300 +/- 0.70000")


def test_parse_bench(bench):
    records = [
        {"n_prompt": 512, "n_gen": 0, "avg_ts": 301.5, "stddev_ts": 2.25, "model_size": 1},
        {"n_prompt": 0, "n_gen": 128, "avg_ts": 55.0, "stddev_ts": 0.5, "model_size": 1},
    ]
    assert bench.parse_bench(json.dumps(records)) == {
        "pp512": {"ts": 301.5, "sd": 2.25},
        "tg128": {"ts": 55.0, "sd": 0.5},
    }


def test_quantize_refusal(bench):
    log = (
        "llama_model_loader: - type  f16:  211 tensors\n"
        "warning: blk.0.attn_k.weight                  - ncols    576 not divisible by 128 (required for type    q1_0)"
        " llama_model_quantize: failed to quantize: no tensor type fallback is defined for type q1_0\n"
        "llama_quantize: failed to quantize model from 'convert-f16.gguf'\n"
    )
    assert bench.quantize_refusal(log) == (
        "rows of 576 weights are not a multiple of its 128-weight blocks and llama.cpp has no fallback type for q1_0"
    )
    assert bench.quantize_refusal("llama_quantize: failed to quantize model from 'x.gguf'") is None


def _row(name: str, type_name: str, shape: tuple[int, ...], bpw: float) -> dict:
    params = math.prod(shape)
    return {"name": name, "type": type_name, "shape": list(shape), "params": params, "bytes": int(params * bpw / 8)}


def test_summarize_tensors_counts_fallbacks_on_block_weights_only(bench):
    rows = [
        _row("token_embd.weight", "Q8_0", (1024, 64), 8.5),
        _row("blk.0.attn_norm.weight", "F32", (64,), 32),
        _row("blk.0.attn_q.weight", "Q4_0", (64, 64), 4.5),
        _row("blk.0.ffn_down.weight", "Q8_0", (64, 128), 8.5),
        _row("blk.1.ffn_down.weight", "Q8_0", (64, 128), 8.5),
    ]
    s = bench.summarize_tensors(rows, "Q4_0")
    blocks = rows[2:]
    assert s["block_bpw"] == pytest.approx(8 * sum(r["bytes"] for r in blocks) / sum(r["params"] for r in blocks))
    assert s["tensor_bytes"] == sum(r["bytes"] for r in rows)
    assert s["file_bpw"] == pytest.approx(8 * s["tensor_bytes"] / sum(r["params"] for r in rows))
    assert s["types"] == {"Q8_0": 3, "F32": 1, "Q4_0": 1}
    assert s["fallbacks"] == {"blk.0.ffn_down.weight": "Q8_0", "blk.1.ffn_down.weight": "Q8_0"}
    assert bench.fallback_summary(s["fallbacks"]) == "Q8_0: ffn_down.weight×2"
    assert bench.fallback_summary({}) == ""


def test_eval_key_names_text_ctx_chunks(bench):
    assert bench.eval_key(Path("/x/wiki.test.raw"), 512, 20) == "c20x512-wiki.test.raw"
