"""The pure parts of scripts/bench_frontier.py: recipes, the plan of files, bits per weight
and the plot's lines. The harness itself runs for real in tests/e2e/test_frontier.py."""

from __future__ import annotations

import pytest
from conftest import imported_script, tensor_row


@pytest.fixture(scope="module")
def bench():
    with imported_script("bench_frontier") as module:
        yield module


# SmolLM2-135M's linears: q/k/v/gate/up read 576 inputs, o 576, down 1536
SHAPES = {
    f"model.layers.0.{name}": shape
    for name, shape in {
        "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
        "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
        "mlp.down_proj": (576, 1536),
    }.items()
}  # fmt: skip


def test_recipes(bench):
    assert bench.Recipe.parse("slim3-g64") == bench.Recipe("slim", 3, 64)
    assert bench.Recipe.parse("gptq2-g128").name == "gptq2-g128"
    budget = bench.Recipe.parse("bpw3.25-hessian")
    assert (budget.bpw, budget.sensitivity, budget.name) == (3.25, "hessian", "bpw3.25-hessian")
    assert bench.Recipe.parse("bpw3").options() == ["--method", "slim", "--bpw", 3.0, "--sensitivity", "fisher"]
    assert bench.line_of({"family": "slim2gguf", "type": "bpw3"}) == "slim2gguf --bpw (fisher)"
    stock = bench.Recipe.parse("bpw4.135-hessian-native")
    assert (stock.bpw, stock.sensitivity, stock.native_budget, stock.name) == (4.135, "hessian", True, "bpw4.135-hessian-native")
    assert bench.Recipe.parse("bpw4-native").options()[-2:] == ["--format", "native"]
    assert bench.line_of({"family": "slim2gguf", "type": "bpw4-native"}) == "slim2gguf --bpw --format native (fisher)"
    for bad in ("slim5-g64", "slim3", "awq3-g64", "slim3-g48", "bpw3-native-hessian"):
        with pytest.raises(bench.BenchError, match="not a recipe like slim3-g64"):
            bench.Recipe.parse(bad)
    ordered = bench.Recipe.parse("slim-q3_k-ao")
    assert (ordered.native, ordered.act_order, ordered.name) == ("q3_k", True, "slim-q3_k-ao")
    assert ordered.options()[-1] == "--act-order" and bench.Recipe.parse("slim2-g64-ao").options()[-1] == "--act-order"
    assert bench.line_of({"family": "slim2gguf", "type": "slim2-g64-ao"}) == "slim2gguf slim g64, act-order"
    for bad in ("rtn2-g64-ao", "bpw3-ao"):
        with pytest.raises(bench.BenchError, match="act-order"):
            bench.Recipe.parse(bad)


def test_default_recipes_fit_the_quantized_inputs(bench):
    whole = bench.default_recipes(SHAPES, None)  # 576 = 9 x 64: no group 128
    assert whole == ["slim2-g64", "slim2-g32", "slim3-g64", "slim3-g32", "slim4-g64", "slim4-g32"]
    assert len(bench.default_recipes(SHAPES, ("ffn_down",))) == 9  # 1536 = 12 x 128


def test_plan_names_files_by_their_inputs(bench, tmp_path):
    args = bench.parse_args(["--tensors", "ffn_down", "--types", "iq2_xs,Q4_K", "--ours", "slim2-g64"])
    args.tensor_classes = ("ffn_down",)
    jobs = bench.plan(args, tmp_path, SHAPES)
    assert [(j.name, j.family) for j in jobs] == [
        ("F16", "llama.cpp"), ("IQ2_XS", "llama.cpp"), ("Q4_K", "llama.cpp"), ("slim2-g64", "slim2gguf"),
    ]  # fmt: skip
    assert jobs[1].path.name == "IQ2_XS-ffn_down-imatrix-valid-32x512.gguf"
    assert jobs[3].path.name == f"slim2-g64-ffn_down-valid-32x512-s0-{bench.code_key()}.gguf"
    with pytest.raises(bench.BenchError, match="unknown type Q3_K_M for this mode"):
        args.types = "Q3_K_M"  # a mix of types, so a whole-model type only
        bench.plan(args, tmp_path, SHAPES)
    args.types, args.ours = "", "bpw3"
    with pytest.raises(bench.BenchError, match="bpw3 is a whole-file budget: measure it without --tensors"):
        bench.plan(args, tmp_path, SHAPES)


def test_quick_sets_only_what_is_not_given(bench):
    quick = bench.parse_args(["--quick", "--chunks", "6"])
    assert (quick.model, quick.tensors, quick.chunks, quick.calib_chunks) == ("smollm2-135m", "ffn_down", 6, 8)
    full = bench.parse_args(["--model", "qwen2.5-coder-1.5b"])
    assert (full.tensors, full.chunks, full.calib_chunks, full.types, full.ours) == (None, 40, 32, None, None)


def test_bits_per_weight_of_file_and_quantized_tensors(bench):
    rows = [
        tensor_row("token_embd.weight", "F16", (1024, 64), 16),
        tensor_row("blk.0.attn_norm.weight", "F32", (64,), 32),
        tensor_row("blk.0.attn_q.weight", "F16", (64, 64), 16),
        tensor_row("blk.0.ffn_down.weight", "IQ2_XS", (64, 256), 2.3125),
    ]
    total_bits = sum(8 * r["bytes"] for r in rows)
    whole = bench.bits_per_weight(rows, None)
    assert whole["bpw_file"] == pytest.approx(total_bits / sum(r["params"] for r in rows))
    assert whole["bpw_blocks"] == pytest.approx((64 * 64 * 16 + 64 * 256 * 2.3125) / (64 * 64 + 64 * 256))
    assert bench.bits_per_weight(rows, ("ffn_down",))["bpw_blocks"] == pytest.approx(2.3125)
    with pytest.raises(bench.BenchError, match="no block weights"):
        bench.bits_per_weight(rows, ("ffn_up",))


def test_plot_lines(bench):
    def line(family: str, type_name: str) -> str:
        return bench.line_of({"family": family, "type": type_name})

    assert line("llama.cpp", "IQ3_XXS") == line("llama.cpp", "IQ4_NL") == "llama.cpp i-quants"
    assert line("llama.cpp", "Q3_K_M") == line("llama.cpp", "Q2_K") == "llama.cpp K-quants"
    assert line("llama.cpp", "Q8_0") == "llama.cpp legacy (Q4_0, Q8_0)"
    assert line("slim2gguf", "slim3-g128") == "slim2gguf slim g128"
    assert line("slim2gguf", "slim-iq3_s") == line("slim2gguf", "slim-q4_k") == "slim2gguf --format native (slim)"


def test_plan_refuses_a_group_size_that_does_not_fit(bench, tmp_path):
    args = bench.parse_args(["--types", "", "--ours", "slim2-g128"])
    args.tensor_classes = None  # whole model: 576 inputs are no multiple of 128
    with pytest.raises(bench.BenchError, match="slim2-g128: group 128 does not divide .*; use g64, g32"):
        bench.plan(args, tmp_path, SHAPES)
    args.tensor_classes = ("ffn_down",)  # 1536 inputs
    assert [j.name for j in bench.plan(args, tmp_path, SHAPES)] == ["F16", "slim2-g128"]


def test_speed_columns_appear_only_when_measured(bench):
    record = {"name": "IQ3_S", "family": "llama.cpp", "file_mib": 1.0, "bpw_file": 3.5, "bpw_blocks": 3.44, "ppl": 9.0,
              "kld_mean": 0.1, "kld_p99": 1.0, "same_top_pct": 80.0}  # fmt: skip
    assert "t/s" not in bench.markdown([record], "h", "bpw_file")
    table = bench.markdown([{**record, "pp512_ts": 51.234, "tg128_ts": 9.5}, {**record, "name": "F16"}], "h", "bpw_file")
    header, rule, *rows = table.splitlines()[2:]
    assert header.endswith("| pp512 t/s | tg128 t/s |") and rule.count("---") == 13
    assert rows[0].endswith("| 51.23 | 9.50 |") and rows[1].endswith("|  |  |")
    assert bench.parse_args(["--speed", "3"]).speed == 3 and bench.parse_args([]).speed == 0
