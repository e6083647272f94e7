"""--format native on a tiny random LLaMA: stock types through the pipeline, the
checkpoint and the export, read back bit for bit; the CLI's errors for bad choices."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from export_helpers import tiny_model_dir
from rich.console import Console
from test_cli import invoke
from test_pipeline import calib, files_of

from slim2gguf.checkpoint import Checkpoint
from slim2gguf.export import export_gguf
from slim2gguf.gguf_weights import slim_weights_from_gguf
from slim2gguf.inspect_gguf import open_gguf, print_inspect
from slim2gguf.methods import QuantSettings
from slim2gguf.models import load_model, set_linear_weights
from slim2gguf.named_models import demo_model_dir
from slim2gguf.pipeline import load_allocation, quantize_model
from slim2gguf.qtensor import NativeTensor
from slim2gguf.storage import NATIVE_TYPES

NATIVE = QuantSettings("slim", native="q4_k")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA with the demo model's tokenizer (llama.cpp's converter knows it)."""
    return tiny_model_dir(tmp_path_factory.mktemp("models") / "llama", "LlamaForCausalLM", demo_model_dir())


@pytest.fixture(scope="module")
def native_ckpt(model_dir, tiny_text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "native"
    quantize_model(str(model_dir), out, NATIVE, calib(tiny_text))
    return out


def test_stock_types_and_fallback_reach_the_checkpoint(native_ckpt):
    """Q4_K where its 256-wide blocks divide the rows (ffn_down: 256 inputs), Q5_0, as
    llama-quantize falls back, where they do not (128 inputs)."""
    ck = Checkpoint(native_ckpt)
    assert ck.settings["native"] == "q4_k" and ck.allocation() == {}
    tensors = dict(ck.tensors())
    assert len(tensors) == 2 * 7 and all(isinstance(t, NativeTensor) for t in tensors.values())
    for name, nt in tensors.items():
        assert nt.type_name == ("q4_k" if name.endswith("down_proj") else "q5_0"), name
        assert ck.manifest["tensors"][name]["type"] == nt.type_name and "widths" not in ck.manifest["tensors"][name]


def test_same_seed_gives_identical_native_checkpoint(native_ckpt, model_dir, tiny_text, tmp_path):
    quantize_model(str(model_dir), tmp_path / "again", NATIVE, calib(tiny_text))
    assert files_of(tmp_path / "again") == files_of(native_ckpt)


def test_export_holds_the_checkpoint_bytes_and_llama_quantize_file_type(native_ckpt, model_dir, tmp_path):
    report = export_gguf(native_ckpt, tmp_path / "out.gguf", "q8_0", "q8_0", progress=False)
    reader = open_gguf(report.path)
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.1.attn_q.weight"] == "Q5_0"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q5_0  # most parameters
    assert reader.fields["slim2gguf.native_type"].contents() == "Q5_0"
    assert "slim2gguf.group_size" not in reader.fields
    assert report.slim_tensors == 14 and report.width_groups == {}
    from_file = slim_weights_from_gguf(reader, model_dir)  # rows back in HF order (LLaMA's q/k permuted)
    stored = {name: nt.dequantize() for name, nt in Checkpoint(native_ckpt).tensors()}
    assert from_file.keys() == stored.keys()
    for name, weight in stored.items():
        assert torch.equal(from_file[name], weight), name
        gguf_py = gguf.quants.dequantize(stored_rows(native_ckpt, name), gguf.GGMLQuantizationType[types_of(name, types)])
        assert np.array_equal(gguf_py, weight.numpy()), name


def stored_rows(ckpt: Path, name: str) -> np.ndarray:
    return dict(Checkpoint(ckpt).tensors())[name].pack()


def types_of(module: str, types: dict[str, str]) -> str:
    block = module.split(".")[2]
    kind = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[module.rsplit(".", 1)[1]]  # fmt: skip
    return types[f"blk.{block}.{kind}.weight"]


def test_model_computes_with_the_stored_values(native_ckpt, model_dir):
    model = load_model(model_dir)
    set_linear_weights(model, {n: nt.dequantize() for n, nt in Checkpoint(native_ckpt).tensors()})
    weight = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(weight, dict(Checkpoint(native_ckpt).tensors())["model.layers.0.mlp.down_proj"].dequantize())


@pytest.fixture(scope="module")
def bpw_native_ckpt(model_dir, tiny_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "bpw"
    return out, quantize_model(str(model_dir), out, QuantSettings("slim", native="auto", bpw=6.0), calib(tiny_text))


def test_bpw_spends_a_budget_over_stock_types(bpw_native_ckpt, tmp_path):
    """--format native --bpw: each linear's stock type (and the embedding's and output's)
    from the budget; the exported file lands on it."""
    out, report = bpw_native_ckpt
    choices = report.decision.choices
    linears = {n: c for n, c in choices.items() if n.startswith("model.layers.")}
    assert len(linears) == 14 and set(linears.values()) <= set(NATIVE_TYPES)
    assert all(c.startswith("q") or c.startswith("iq") for c in linears.values())
    tensors = dict(Checkpoint(out).tensors())
    assert {n: t.type_name for n, t in tensors.items()} == linears
    exported = export_gguf(out, tmp_path / "out.gguf", progress=False)
    assert abs(exported.file_bpw - 6.0) <= 0.02
    assert len(set(linears.values())) > 1
    console = Console(record=True, width=200)
    print_inspect(tmp_path / "out.gguf", console)
    assert "bits per weight by block and tensor class" in console.export_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type", "q4_k"], "add --format native"),
        (["--format", "native", "--bits", "2"], "--bits sets SliM widths"),
        (["--format", "native", "--sba"], "--sba/--no-sba tunes SliM types"),  # each was accepted and ignored
        (["--format", "native", "--bpw", "4.5", "--no-sba"], "stock types have their own: drop it with --format native"),
        (["--format", "native", "--group-size", "32", "--fit", "sqc"], "--group-size, --fit tune SliM types"),
        (["--format", "native", "--sqc-lambda", "5", "--no-sqc", "--sba-tokens", "64"], "--sqc-lambda, --sqc/--no-sqc, --sba-tokens tune SliM types"),
        (["--format", "native", "--type", "q4_z"], "native type must be one of"),
        (["--format", "gguf"], "--format must be slim or native"),
        (["--format", "native", "--bpw", "4.5", "--type", "q4_k"], "--bpw chooses every tensor's stock type"),
        (["--format", "native", "--type", "iq2_xs", "--act-order"], "IQ2_XS rounds runs of them"),
        (["--method", "rtn", "--act-order"], "--act-order orders GPTQ's columns"),
        (["--allocation", "alloc.json", "--bits", "2"], "--allocation fixes every tensor's widths, and so its bits: drop --bits"),
    ],
)
def test_cli_refuses_bad_native_choices(tiny_model, tmp_path, args, message):
    code, out = invoke("quantize", str(tiny_model), "-o", str(tmp_path / "ck"), *args)
    assert code == 2 and message in out and "Traceback" not in out
    assert not (tmp_path / "ck").exists()


def test_allocation_reuses_a_stock_type_budget(bpw_native_ckpt, model_dir, tiny_text, tmp_path, monkeypatch):
    """--format native --allocation M: a stock-type --bpw run's decision is reused whole
    (each linear's type, the embedding's and output's), with no sensitivity pass."""
    from slim2gguf import sensitivity

    monkeypatch.setattr(sensitivity, "measure", lambda *a, **k: pytest.fail("a reused decision measures again"))
    source, decided = bpw_native_ckpt
    out = tmp_path / "reused"
    report = quantize_model(str(model_dir), out, QuantSettings("slim", native="auto"), calib(tiny_text),
                            allocation=load_allocation(source / "manifest.json"))  # fmt: skip
    assert report.decision.choices == decided.decision.choices and Checkpoint(out).budget == Checkpoint(source).budget
    assert {n: t.type_name for n, t in Checkpoint(out).tensors()} == {n: t.type_name for n, t in Checkpoint(source).tensors()}
    assert block_files(out) == block_files(source)  # same calibration: the same tensors (the manifests' settings differ)


def block_files(ckpt: Path) -> dict[str, bytes]:
    return {name: data for name, data in files_of(ckpt).items() if name.startswith("blocks/")}


def test_stock_types_need_a_budget_or_a_decision(model_dir, tiny_text, tmp_path):
    with pytest.raises(ValueError, match="need --bpw, or the --allocation"):
        quantize_model(str(model_dir), tmp_path / "ck", QuantSettings("slim", native="auto"), calib(tiny_text))
    with pytest.raises(ValueError, match="drop --act-order"):
        QuantSettings("slim", native="auto", bpw=4.0, act_order=True)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    ("source", "args", "message"),
    [
        ("native", ["--format", "native"], "chosen by no --bpw budget: nothing to reuse"),
        ("bpw", [], "add --format native, no --type"),
        ("bpw", ["--format", "native", "--type", "q4_k"], "--allocation gives every tensor's stock type: drop --type"),
        ("slim", ["--format", "native"], "--allocation gives SliM widths: drop --format native"),
    ],
)
def test_cli_refuses_allocations_of_the_other_format(source, args, message, native_ckpt, bpw_native_ckpt, model_dir, tmp_path):
    manifest = tmp_path / "widths.json"
    manifest.write_text('{"model.layers.0.mlp.down_proj": [3, 3]}')
    manifest = {"native": native_ckpt / "manifest.json", "bpw": bpw_native_ckpt[0] / "manifest.json", "slim": manifest}[source]
    code, out = invoke("quantize", str(model_dir), "-o", str(tmp_path / "ck"), "--allocation", str(manifest), *args)
    assert code == 2 and message in out and "Traceback" not in out
    assert not (tmp_path / "ck").exists()


def test_native_refuses_slim_only_paths(native_ckpt, model_dir, tiny_text, tmp_path):
    code, out = invoke("eval", str(model_dir), "--checkpoint", str(native_ckpt), "--text", str(tiny_text), "--backend", "triton")
    assert code == 2 and "SliM types only" in out
