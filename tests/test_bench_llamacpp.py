"""The pure helpers of scripts/bench_llamacpp.py: parsing llama.cpp's output and summing
tensor sizes. No llama.cpp runs here; the log excerpts are what the pinned tools print."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import imported_script, tensor_row

from slim2gguf.run import LlamaToolError


@pytest.fixture(scope="module")
def bench():
    with imported_script("bench_llamacpp") as module:
        yield module


KLD_LOG = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  33.271234 ±   0.912345
Mean PPL(base)                :  26.930000 ±   0.700000
Cor(ln(PPL(Q)), ln(PPL(base))):  97.12%
Mean ln(PPL(Q)/PPL(base))     :   0.211300 ±   0.004000

====== KL divergence statistics ======
Mean    KLD:   0.123456 ±   0.001234
Maximum KLD:  12.345678
99.9%   KLD:   4.500000
99.0%   KLD:   1.250000
99.0%   KLD:   1.250000
Median  KLD:   0.050000

====== Token probability statistics ======
Mean    Δp: -1.234 ± 0.056 %
99.0%   Δp: 12.345%
RMS Δp    :  8.765 ± 0.123 %
Same top p: 87.654 ± 0.321 %
"""


def test_parse_kld_stats(bench):
    assert bench.parse_kld_stats(KLD_LOG) == {
        "ppl": 33.271234, "kld_mean": 0.123456, "kld_p99": 1.25, "same_top_pct": 87.654,
    }  # fmt: skip


def test_parse_kld_stats_huge_and_missing(bench):
    tail = "\n99.0%   KLD:   3.0\nSame top p: 10.000 ± 0.1 %"
    stats = bench.parse_kld_stats("Mean PPL(Q)                   : 3783243.123400 ± 1.0\nMean    KLD:   9.5 ± 0.1" + tail)
    assert (stats["ppl"], stats["kld_mean"]) == (3783243.1234, 9.5)
    stats = bench.parse_kld_stats("Mean PPL(Q)                   :        inf ± nan\nMean    KLD:   1 ± 0" + tail)
    assert math.isinf(stats["ppl"])
    with pytest.raises(LlamaToolError, match="ppl, kld_mean, kld_p99, same_top_pct"):
        bench.parse_kld_stats("Final estimate: PPL = 26.9300 +/- 0.70000")
    with pytest.raises(LlamaToolError, match="no same_top_pct"):
        bench.parse_kld_stats(KLD_LOG.replace("Same top p", "Same top"))


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


def test_summarize_tensors_counts_fallbacks_on_block_weights_only(bench):
    rows = [
        tensor_row("token_embd.weight", "Q8_0", (1024, 64), 8.5),
        tensor_row("blk.0.attn_norm.weight", "F32", (64,), 32),
        tensor_row("blk.0.attn_q.weight", "Q4_0", (64, 64), 4.5),
        tensor_row("blk.0.ffn_down.weight", "Q8_0", (64, 128), 8.5),
        tensor_row("blk.1.ffn_down.weight", "Q8_0", (64, 128), 8.5),
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
