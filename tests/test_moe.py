"""Mixture-of-experts models (Qwen 2 MoE, Qwen 3 MoE, Mixtral): each expert's projections are
linears of their own that compute what transformers' fused experts compute, load from the
checkpoints' per-expert weights a block at a time, get their Hessians from the tokens routed
to them (topped up from all tokens when few are), and are stacked back by llama.cpp's
converter one tensor per kind, which the export's probe follows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_helpers import tiny_model_dir

from slim2gguf.architectures import in_classes, tensor_class
from slim2gguf.checkpoint import Checkpoint
from slim2gguf.export import ExportError
from slim2gguf.export_child import Probe
from slim2gguf.methods import QuantSettings
from slim2gguf.models import block_linear_shapes, block_linears, load_model
from slim2gguf.moe import ExpertInputs, Experts, top_up
from slim2gguf.named_models import demo_model_dir
from slim2gguf.pipeline import CalibSettings, InputCollector, _open_model, quantize_model
from slim2gguf.text_model import BlockLoader

QWEN_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128}
MODELS = {
    "Qwen2MoeForCausalLM": QWEN_MOE,
    "Qwen3MoeForCausalLM": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    "MixtralForCausalLM": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {arch: tiny_model_dir(root / arch, arch, demo_model_dir(), **config) for arch, config in MODELS.items()}


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_unfused_experts_compute_what_transformers_computes(moe_dirs, arch):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(moe_dirs[arch], dtype=torch.float32).eval()
    model = load_model(moe_dirs[arch])
    assert all(isinstance(layer.mlp.experts, Experts) for layer in model.model.layers)
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(tokens).logits, reference(tokens).logits, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_expert_projection_is_a_quantized_linear_and_routers_are_not(moe_dirs, arch):
    model = load_model(moe_dirs[arch])
    names = set(block_linears(model, 0))
    kinds = {"Mixtral": ("w1", "w3", "w2")}.get(arch[:7], ("gate_proj", "up_proj", "down_proj"))
    experts = {f"model.layers.0.mlp.experts.{e}.{k}" for e in range(4) for k in kinds}
    assert experts <= names
    assert {tensor_class(n) for n in experts} == {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
    assert not any("gate.weight" in n or n.endswith("shared_expert_gate") for n in names)  # routers stay float
    assert not in_classes("model.layers.0.mlp.shared_expert_gate", None)
    if arch == "Qwen2MoeForCausalLM":
        assert {tensor_class(n) for n in names if "shared_expert." in n} == {"ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"}
    assert block_linear_shapes(moe_dirs[arch]) == {n: tuple(lin.weight.shape) for i in range(2) for n, lin in block_linears(model, i).items()}


@torch.no_grad()
def test_block_loader_reads_the_checkpoints_per_expert_weights(moe_dirs):
    path = moe_dirs["MixtralForCausalLM"]  # its files keep the MoE block as block_sparse_moe
    whole = dict(load_model(path).named_parameters())
    loader = BlockLoader(path)
    loader.load("model.layers.1")
    loaded = {n: p for n, p in loader.skeleton.named_parameters() if n.startswith("model.layers.1.")}
    assert loaded and all(torch.equal(p, whole[n]) for n, p in loaded.items())


@torch.no_grad()
def test_an_expert_few_tokens_reach_is_topped_up_from_all_tokens():
    from slim2gguf.moe import ExpertMLP

    torch.manual_seed(0)
    experts = Experts(ExpertMLP(("gate_proj", "up_proj", "down_proj"), 16, 8, torch.nn.SiLU(), torch.device("cpu")) for _ in range(3))
    layer = torch.nn.Module()
    layer.experts = experts
    x = torch.randn(40, 16)
    route = torch.zeros(40, 1, dtype=torch.long)
    route[:5] = 1  # expert 1: 5 tokens (under its 16 and 8 inputs); expert 2: none; expert 0: 35
    weights = torch.ones(40, 1)
    linears = {f"blk.experts.{e}.{k}": getattr(experts[e], k) for e in range(3) for k in experts[e].names}
    sampling = (40, torch.arange(0, 40, 4))
    collectors = {n: InputCollector(lin, *sampling, torch.device("cpu")) for n, lin in linears.items()}
    handles = [lin.register_forward_hook(collectors[n]) for n, lin in linears.items()]
    with ExpertInputs(layer, "blk") as recorded:
        experts(x, route, weights)
    for h in handles:
        h.remove()
    routed = {n: (c.h.clone(), c.seen) for n, c in collectors.items()}
    topped = top_up(recorded, collectors, lambda lin: InputCollector(lin, *sampling, torch.device("cpu")))
    assert topped == {f"blk.experts.{e}.{k}": n for e, n in ((1, 5), (2, 0)) for k in ("gate_proj", "up_proj", "down_proj")}
    scale = 2.0 / 40
    every_in = scale * x.T @ x  # what all 40 tokens give expert 1's gate and up projections
    h, seen = routed["blk.experts.1.gate_proj"]
    assert torch.allclose(collectors["blk.experts.1.gate_proj"].h, h + (16 - seen) / 40 * every_in, atol=1e-5)
    assert torch.allclose(collectors["blk.experts.2.up_proj"].h, 16 / 40 * every_in, atol=1e-5)
    inner = torch.nn.functional.silu(experts[2].gate_proj(x)) * experts[2].up_proj(x)
    assert torch.allclose(collectors["blk.experts.2.down_proj"].h, 8 / 40 * scale * inner.T @ inner, atol=1e-5)
    assert torch.equal(collectors["blk.experts.0.gate_proj"].h, routed["blk.experts.0.gate_proj"][0])  # 35 tokens: kept
    assert sum(len(s) for s in collectors["blk.experts.2.down_proj"].sample) == 10  # all tokens' sample


def test_quantize_a_moe_model_tops_up_its_rarely_routed_experts(tiny_text, tmp_path):
    """8 experts, one per token, 256 calibration tokens: every expert's gate and up projections
    see fewer tokens than their 128 inputs, so each is topped up, and the manifest keeps each
    one's routed count (they add up to the calibration tokens); a down projection (64 inputs)
    only where its expert saw fewer than 64."""
    config = {"num_experts": 8, "num_experts_per_tok": 1, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128}
    path = tiny_model_dir(tmp_path / "model", "Qwen2MoeForCausalLM", demo_model_dir(), **config)
    out = tmp_path / "ckpt"
    settings = QuantSettings("slim", 3, 32, sba_tokens=128)
    quantize_model(str(path), out, settings, CalibSettings(str(tiny_text), nsamples=4, seqlen=64, seed=1))
    ckpt = Checkpoint(out)
    assert set(dict(ckpt.tensors())) == set(block_linear_shapes(path))
    for b, block in enumerate(ckpt.manifest["blocks"]):
        routed = block["experts_topped_up"]
        gate = [routed[f"model.layers.{b}.mlp.experts.{e}.gate_proj"] for e in range(8)]
        assert sum(gate) == 4 * 64 and all(n < 128 for n in gate)
        down = {e: routed.get(f"model.layers.{b}.mlp.experts.{e}.down_proj") for e in range(8)}
        assert down == {e: gate[e] if gate[e] < 64 else None for e in range(8)}  # down_proj has 64 inputs


def test_bpw_gives_a_blocks_experts_of_one_kind_one_setting(moe_dirs, tiny_text, tmp_path):
    """llama.cpp stacks them into one tensor of one type: the budget decides per stack, and
    the file lands on the decision's bits per weight through the real exporter."""
    from slim2gguf import budget
    from slim2gguf.export import export_gguf

    path = moe_dirs["MixtralForCausalLM"]
    shapes = budget.model_shapes(path, None)
    stacks = {k: v for k, v in shapes.items().items() if ".experts.*." in k}
    assert len(stacks) == 2 * 3 and all(len(v) == 4 for v in stacks.values())
    sizes = budget._file_sizes(shapes)
    target = float(sizes[len(sizes) // 2])
    out = tmp_path / "ck"
    quantize_model(str(path), out, QuantSettings("gptq", bpw=target), CalibSettings(str(tiny_text), nsamples=4, seqlen=64, seed=1))
    decision = Checkpoint(out).budget
    for names in stacks.values():
        assert len({decision["choices"][n] for n in names}) == 1
    assert len({decision["choices"][n] for n in shapes.linears}) > 1  # the budget did mix settings
    report = export_gguf(out, tmp_path / "out.gguf", progress=False)
    assert report.file_bpw == pytest.approx(decision["bpw"], abs=1e-9)
    assert abs(report.file_bpw - target) <= budget.TOLERANCE


def test_probe_follows_stacked_experts_and_refuses_what_is_not_a_stack():
    probe = Probe()
    parts = [probe.make(f"e{i}", (4, 6)) for i in range(3)]
    names, which, rows = probe.sources(torch.stack(parts), "exps")
    assert names == ["e0", "e1", "e2"] and which.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and rows.tolist() == [0, 1, 2, 3] * 3
    assert not probe.pending  # consumed: the next probe counts from 0 again
    assert int(probe.make("x", (2, 6))[0, 0]) == 0
    probe = Probe()
    parts = [probe.make(f"e{i}", (4, 6)) for i in range(2)]
    names, which, rows = probe.sources(torch.stack([parts[1], parts[0].flip(0)]), "exps")
    assert names == ["e1", "e0"] and rows.tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    probe = Probe()
    parts = [probe.make(f"e{i}", (4, 6)) for i in range(2)]
    with pytest.raises(ExportError, match="duplicates or drops rows of e1"):
        probe.sources(torch.stack([parts[0], parts[1][[0, 0, 1, 2]]]), "exps")
    probe = Probe()
    parts = [probe.make(f"e{i}", (4, 6)) for i in range(2)]
    with pytest.raises(ExportError, match="converter"):
        probe.sources(torch.cat(parts, dim=1), "exps")  # columns joined, not rows


def test_probe_values_stay_in_int32_until_they_cannot():
    probe = Probe()
    assert probe.make("a", (2, 3)).dtype == torch.int32
    probe.next = 2**31 - 4
    assert probe.make("b", (2, 3)).dtype == torch.int64


def test_a_checkpoint_with_fused_experts_is_refused_with_a_reason(moe_dirs, tmp_path):
    """transformers' own state dict keeps the experts fused; published checkpoints do not."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from slim2gguf.models import ModelError

    src = moe_dirs["Qwen3MoeForCausalLM"]
    path = tmp_path / "fused"
    path.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (path / f.name).write_bytes(f.read_bytes())
    state = AutoModelForCausalLM.from_pretrained(src).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    for whole in (False, True):
        with pytest.raises(ModelError, match="stores its experts fused"):
            _open_model(path, whole)


def test_validating_a_moe_file_alone_says_to_give_the_model(moe_dirs, tmp_path):
    """transformers' GGUF importer merges a Qwen MoE file's experts across tensors, which
    slim2gguf does not read: validate without --model says so in one line."""
    from typer.testing import CliRunner

    from slim2gguf.cli import app
    from slim2gguf.export import export_gguf

    out = tmp_path / "ck"
    quantize_model(str(moe_dirs["Qwen2MoeForCausalLM"]), out, QuantSettings("rtn", 4, 32), CalibSettings("self"))
    export_gguf(out, tmp_path / "moe.gguf", progress=False)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "moe.gguf"), "--text", str(text), "--ctx", "64", "--chunks", "1"])
    assert result.exit_code == 2, result.output
    assert "merged across the file" in result.output and "give --model" in result.output
    assert "Traceback" not in result.output
