"""Export: checkpoint -> GGUF through llama.cpp's converter, read back bit for bit.

Every export runs llama.cpp's converter in a child process (a few seconds of imports
each) and every GGUF with a real tokenizer takes seconds to parse, so fixtures are
module-scoped and the files are opened once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from export_helpers import (
    LINEARS,
    linear_shapes,
    random_qtensor,
    raw_fields,
    sentencepiece_tokenizer_dir,
    tiny_model_dir,
    write_random_checkpoint,
    write_small_gguf,
)
from rich.console import Console
from safetensors.torch import load_file

from slim2gguf import __version__
from slim2gguf import format as fmt
from slim2gguf.architectures import SUPPORTED_ARCHITECTURES
from slim2gguf.checkpoint import CheckpointWriter
from slim2gguf.export import ExportError, ExportReport, ExportWarning, child_command, export_gguf
from slim2gguf.inspect_gguf import GGUFFileError, dequantize_tensor, inspect_rows, open_gguf, print_inspect
from slim2gguf.llamacpp import ensure_source
from slim2gguf.named_models import demo_model_dir
from slim2gguf.qtensor import QuantizedTensor
from slim2gguf.sensitivity import native_error

GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_up_proj": "ffn_up",
}
# KVs that legitimately differ from `convert_hf_to_gguf.py --outtype f32`:
# general.file_type names the SliM type instead of ALL_F32 (see export_gguf), and the
# reader's pseudo-key GGUF.kv_count also counts our slim2gguf.* provenance keys.
DIFFERING_KEYS = {"general.file_type", "GGUF.kv_count"}
OUR_PREFIX = "slim2gguf."


@dataclass(frozen=True)
class Family:
    architecture: str
    bits: int
    group: int
    embed: str
    output: str
    config: dict
    skip: tuple[str, ...] = ()  # linears left out of the checkpoint: exported as F32
    norm_shift: float = 0.0  # what llama.cpp's converter adds to norm weights (Gemma's 1 + w)
    sentencepiece: bool = False  # its converter reads tokenizer.model (Gemma 2), not the demo's BPE


FAMILIES = {
    "llama": Family("LlamaForCausalLM", 3, 64, "q8_0", "f16", {"tie_word_embeddings": False}),
    "qwen3": Family(
        "Qwen3ForCausalLM", 2, 128, "bf16", "q8_0", {"hidden_size": 256, "tie_word_embeddings": True},
        skip=("model.layers.1.mlp.down_proj",),
    ),
    "gemma2": Family(
        "Gemma2ForCausalLM", 3, 64, "q8_0", "q8_0", {"sliding_window": 16}, norm_shift=1.0, sentencepiece=True
    ),
    "gemma3": Family(
        "Gemma3ForCausalLM", 4, 32, "q8_0", "q8_0", {"tie_word_embeddings": True, "sliding_window": 16}, norm_shift=1.0
    ),
    "phi3": Family(
        "Phi3ForCausalLM", 3, 32, "q4_0", "q8_0", {"tie_word_embeddings": False, "num_key_value_heads": 4},
        skip=("model.layers.0.mlp.gate_up_proj",),
    ),
}


@dataclass
class Exported:
    family: Family
    model: Path
    reference: dict[str, QuantizedTensor]
    report: ExportReport
    reader: gguf.GGUFReader
    warnings: list[str]

    @property
    def bits(self) -> int:
        return self.family.bits

    @property
    def group(self) -> int:
        return self.family.group


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for LLaMA: each head's two rotary halves interleaved."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    return demo_model_dir()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, demo_dir, tiny_text) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    spm_dir = sentencepiece_tokenizer_dir(root / "spm", tiny_text)
    return {
        name: tiny_model_dir(root / name, f.architecture, spm_dir if f.sentencepiece else demo_dir, **f.config)
        for name, f in FAMILIES.items()
    }


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory, tiny_models) -> Exported:
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = tiny_models[request.param]
    reference = write_random_checkpoint(root / "ckpt", model, family.bits, family.group, skip=family.skip)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        report = export_gguf(root / "ckpt", root / "out.gguf", family.embed, family.output, progress=False)
    notes = [str(w.message) for w in caught if w.category is ExportWarning]
    return Exported(family, model, reference, report, open_gguf(report.path), notes)


def test_roundtrip_bit_exact(exported):
    config = json.loads((exported.model / "config.json").read_text())
    types = {t.name: t.tensor_type for t in exported.reader.tensors}
    stype = fmt.slim_type(exported.bits, exported.group)
    for name, qt in exported.reference.items():
        block, linear = name.removeprefix("model.layers.").split(".", 1)
        gguf_name = f"blk.{block}.{GGUF_NAMES[linear]}.weight"
        expected = qt.dequantize()
        if config["architectures"][0] == "LlamaForCausalLM" and linear in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = config["num_attention_heads"] if linear == "self_attn.q_proj" else config["num_key_value_heads"]
            expected = rope_permute(expected, heads)
        assert types[gguf_name] == stype.type_id
        got = dequantize_tensor(exported.reader, gguf_name)
        assert np.array_equal(got.view(np.uint32), expected.numpy().view(np.uint32)), gguf_name

    report = exported.report
    assert report.slim_tensors == len(exported.reference)
    assert len(exported.reference) + len(exported.family.skip) == config["num_hidden_layers"] * len(linear_shapes(config))
    assert report.slim_bpw == exported.bits + 32 / exported.group
    assert report.file_type == stype.type_id
    assert set(report.width_groups) <= {exported.bits - 1, exported.bits, exported.bits + 1}


def test_standard_tensors(exported):
    config = json.loads((exported.model / "config.json").read_text())
    types = {t.name: t.tensor_type for t in exported.reader.tensors}
    weights = load_file(str(exported.model / "model.safetensors"))
    embed_type = gguf.GGMLQuantizationType[exported.family.embed.upper()]
    assert types["token_embd.weight"] == embed_type
    embedding = weights["model.embed_tokens.weight"].numpy()
    roundtrip = gguf.quants.dequantize(gguf.quants.quantize(embedding, embed_type), embed_type)
    assert np.array_equal(dequantize_tensor(exported.reader, "token_embd.weight"), roundtrip)
    if config["tie_word_embeddings"]:
        assert "output.weight" not in types
    else:
        assert types["output.weight"] == gguf.GGMLQuantizationType[exported.family.output.upper()]
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    norm = dequantize_tensor(exported.reader, "output_norm.weight")
    assert np.array_equal(norm, weights["model.norm.weight"].numpy() + np.float32(exported.family.norm_shift))


def test_metadata_and_tokenizer_match_upstream_in_every_family(exported, tmp_path):
    """The KV section as llama.cpp's converter writes it for the same model, byte for byte."""
    upstream = tmp_path / "upstream.gguf"
    cmd = [sys.executable, str(ensure_source() / "convert_hf_to_gguf.py"), str(exported.model), "--outtype", "f32", "--outfile", str(upstream)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    mine = {k: v for k, v in raw_fields(exported.reader).items() if not k.startswith(OUR_PREFIX)}
    theirs = raw_fields(open_gguf(upstream))
    assert list(mine) == list(theirs)
    assert {k for k in mine if mine[k] != theirs[k]} == DIFFERING_KEYS


def test_linears_missing_from_checkpoint_stay_f32(exported):
    weights = load_file(str(exported.model / "model.safetensors"))
    expected_notes = []
    for name in exported.family.skip:
        block, linear = name.removeprefix("model.layers.").split(".", 1)
        gguf_name = f"blk.{block}.{GGUF_NAMES[linear]}.weight"
        assert np.array_equal(dequantize_tensor(exported.reader, gguf_name), weights[name + ".weight"].numpy())
        expected_notes.append(f"{gguf_name} is not in the checkpoint; stored as F32")
    assert exported.warnings == expected_notes


def test_file_size_is_the_promised_budget(exported):
    reader, report = exported.reader, exported.report
    stype = fmt.slim_type(exported.bits, exported.group)
    slim_bytes = 0
    for tensor in reader.tensors:
        if fmt.type_from_id(tensor.tensor_type) is not None:
            cols, rows = (int(n) for n in tensor.shape)
            assert tensor.n_bytes == rows * (cols // exported.group) * stype.block_bytes
            slim_bytes += tensor.n_bytes
    promised = sum(q.shape[0] * (q.shape[1] // exported.group) * stype.block_bytes for q in exported.reference.values())
    assert slim_bytes == report.slim_bytes == promised
    assert sum(t.n_bytes for t in reader.tensors) == report.total_bytes
    assert sum(int(t.n_elements) for t in reader.tensors) == report.total_params
    end = reader.data_offset
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        assert tensor.data_offset == end
        end += -(-tensor.n_bytes // reader.alignment) * reader.alignment
    assert end == report.path.stat().st_size


def test_gguf_py_dequantizes_slim_tensors(exported):
    """gguf-py's own entry point (what transformers' GGUF loader calls) reads SliM rows."""
    for tensor in exported.reader.tensors:
        if fmt.type_from_id(tensor.tensor_type) is not None:
            ours = dequantize_tensor(exported.reader, tensor.name)
            theirs = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            assert theirs.dtype == np.float32 and np.array_equal(theirs.reshape(ours.shape), ours)


def test_inspect_rows_reports_types_and_widths(exported):
    rows = inspect_rows(exported.reader)
    assert [row["name"] for row in rows] == [t.name for t in exported.reader.tensors]
    slim = [row for row in rows if row["widths"] is not None]
    assert len(slim) == len(exported.reference)
    stype = fmt.slim_type(exported.bits, exported.group)
    assert all(row["type"] == stype.name and row["bpw"] == stype.bits_per_weight for row in slim)
    totals: dict[int, int] = {}
    for row in slim:
        for width, n in row["widths"].items():
            totals[width] = totals.get(width, 0) + n
    assert totals == exported.report.width_groups


@pytest.fixture(scope="module")
def demo_readers(tmp_path_factory, demo_dir) -> tuple[gguf.GGUFReader, gguf.GGUFReader]:
    """Our export of a random 3-bit checkpoint for the demo model, and the converter's own f32 file."""
    root = tmp_path_factory.mktemp("demo")
    upstream = root / "upstream.gguf"
    script = ensure_source() / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(demo_dir), "--outtype", "f32", "--outfile", str(upstream)]
    converter = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # runs beside our export
    write_random_checkpoint(root / "ckpt", demo_dir, 3, 64)
    ours = export_gguf(root / "ckpt", root / "slim.gguf", progress=False).path
    _, stderr = converter.communicate()
    assert converter.returncode == 0, stderr.decode()[-2000:]
    return open_gguf(ours), open_gguf(upstream)


def test_metadata_and_tokenizer_match_upstream(demo_readers):
    ours, upstream = demo_readers
    mine = {k: v for k, v in raw_fields(ours).items() if not k.startswith(OUR_PREFIX)}
    theirs = raw_fields(upstream)
    assert list(mine) == list(theirs)  # same keys, same order
    assert {k for k in mine if mine[k] != theirs[k]} == DIFFERING_KEYS
    assert ours.fields["general.file_type"].contents() == fmt.slim_type(3, 64).type_id
    assert upstream.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert {k: f.contents() for k, f in ours.fields.items() if k.startswith(OUR_PREFIX)} == {
        "slim2gguf.version": __version__,
        "slim2gguf.method": "random",
        "slim2gguf.bits": 3,
        "slim2gguf.group_size": 64,
    }
    assert len(upstream.fields["tokenizer.ggml.tokens"].data) == 49152


def test_tensors_match_upstream(demo_readers):
    ours, upstream = demo_readers
    assert [(t.name, t.shape.tolist()) for t in ours.tensors] == [(t.name, t.shape.tolist()) for t in upstream.tensors]
    stype = fmt.slim_type(3, 64)
    for mine, theirs in zip(ours.tensors, upstream.tensors):
        if mine.name.endswith("norm.weight"):
            assert mine.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(mine.data, theirs.data)
        elif mine.name == "token_embd.weight":
            assert mine.tensor_type == gguf.GGMLQuantizationType.Q8_0
        else:
            assert fmt.type_from_id(mine.tensor_type) == stype, mine.name
            assert mine.n_bytes == int(mine.shape[1]) * stype.row_bytes(int(mine.shape[0]))
    assert sum(fmt.type_from_id(t.tensor_type) is not None for t in ours.tensors) == 30 * len(LINEARS)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    return write_small_gguf(tmp_path_factory.mktemp("small") / "small.gguf")


def test_small_gguf_reads(small_gguf):
    rows = inspect_rows(small_gguf)
    assert [(r["name"], r["type"], r["shape"]) for r in rows] == [
        ("blk.0.ffn_up.weight", "SLIM3_G64", (64, 128)),
        ("output_norm.weight", "F32", (128,)),
    ]
    assert dequantize_tensor(small_gguf, "blk.0.ffn_up.weight").shape == (64, 128)
    with pytest.raises(KeyError, match="nope"):
        dequantize_tensor(small_gguf, "nope")
    console = Console(record=True, width=200)
    print_inspect(small_gguf, console)
    text = console.export_text()
    assert "SLIM3_G64" in text and "1 SliM tensors: 8,192 parameters, 3,584 bytes of data, 3.500 bpw" in text


@pytest.mark.parametrize("damage", ["empty", "garbage", "bad_magic", "header_cut", "data_cut", "missing", "folder"])
def test_inspect_rejects_broken_files(small_gguf, tmp_path, damage):
    data = small_gguf.read_bytes()
    broken = tmp_path / "broken.gguf"
    content = {
        "empty": b"",
        "garbage": np.random.default_rng(0).bytes(4096),
        "bad_magic": b"GGUX" + data[4:],
        "header_cut": data[:100],
        "data_cut": data[:-100],
    }
    if damage == "folder":
        broken.mkdir()
    elif damage != "missing":
        broken.write_bytes(content[damage])
    with pytest.raises(GGUFFileError) as err:
        inspect_rows(broken)
    message = str(err.value)
    assert "\n" not in message and str(broken) in message


def test_inspect_rejects_bad_width_code(small_gguf, tmp_path):
    reader = open_gguf(small_gguf)
    tensor = next(t for t in reader.tensors if fmt.type_from_id(t.tensor_type) is not None)
    data = bytearray(small_gguf.read_bytes())
    data[tensor.data_offset] |= 0x01  # d_bits bit 0 and bit 15 set: width code 3
    data[tensor.data_offset + 1] |= 0x80
    broken = tmp_path / "bad_code.gguf"
    broken.write_bytes(bytes(data))
    with pytest.raises(GGUFFileError, match="invalid width code"):
        inspect_rows(broken)


@pytest.mark.parametrize(
    "transform, accepted",
    [
        (lambda p: p, True),
        (lambda p: rope_permute(p, 4), True),
        (lambda p: p.flip(0), True),
        (lambda p: p.flip(1), False),  # columns reordered
        (lambda p: p.T.reshape(p.shape), False),  # reshaped
        (lambda p: p[[0] * p.shape[0]], False),  # a row repeated
        (lambda p: p.float(), False),  # converted
        (lambda p: p[:, :8], False),  # cut
    ],
)
def test_row_mapping_accepts_only_row_permutations(transform, accepted):
    from slim2gguf.export_child import Probe

    probes = Probe()
    probe = probes.make("w", (16, 12))
    out = transform(probe)
    if accepted:
        names, which, rows = probes.sources(out, "w")
        assert names == ["w"] and not which.any()
        assert torch.equal(probe[torch.from_numpy(rows)], out)
    else:
        with pytest.raises(ExportError, match="converter"):
            probes.sources(out, "w")


def _one_tensor_checkpoint(target: Path, model_dir: Path, architecture: str, shape: tuple[int, int] = (64, 128)) -> Path:
    settings = {
        "model_path": str(model_dir),
        "architecture": architecture,
        "bits": 3,
        "group_size": 64,
        "method": "random",
    }
    writer = CheckpointWriter(target, settings, 1)
    gen = torch.Generator().manual_seed(0)
    writer.write_block(0, {"model.layers.0.mlp.up_proj": random_qtensor(*shape, 3, 64, gen)}, {})
    return writer.finish({})


def test_plain_rope_is_written_without_the_converters_false_alarm(tmp_path, demo_dir, capfd):
    """transformers 5 names plain RoPE "default"; llama.cpp's converter warns it does not
    know that type, then rightly writes no scaling. The export keeps the metadata and drops
    the warning, which every conversion of such a config printed."""
    model = tiny_model_dir(tmp_path / "model", "LlamaForCausalLM", demo_dir)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config.pop("rope_scaling", None)
    (model / "config.json").write_text(json.dumps(config))
    ckpt = _one_tensor_checkpoint(tmp_path / "ck", model, "LlamaForCausalLM", shape=(256, 128))
    with warnings.catch_warnings():  # the float model's other linears are not in the checkpoint
        warnings.simplefilter("ignore", ExportWarning)
        export_gguf(ckpt, tmp_path / "out.gguf", progress=False)
    assert "Unknown RoPE type" not in capfd.readouterr().err
    fields = open_gguf(tmp_path / "out.gguf").fields
    assert "llama.rope.scaling.type" not in fields
    assert float(fields["llama.rope.freq_base"].parts[-1][0]) == 10000.0


def test_k_quant_embedding_and_output_are_rounded_by_storage(tmp_path, demo_dir):
    """gguf-py cannot write K-quants: the exporter rounds the embedding and output with
    slim2gguf.storage, as the sensitivity pass scores them; where the type's blocks do
    not divide the rows, its 32-wide fallback, with a warning."""
    model = tiny_model_dir(tmp_path / "wide", "LlamaForCausalLM", demo_dir, hidden_size=256, intermediate_size=128,
                           head_dim=64, tie_word_embeddings=False)  # fmt: skip
    ckpt = _one_tensor_checkpoint(tmp_path / "ck", model, "LlamaForCausalLM", shape=(128, 256))
    with warnings.catch_warnings():  # the float model's other linears are not in the checkpoint
        warnings.simplefilter("ignore", ExportWarning)
        export_gguf(ckpt, tmp_path / "out.gguf", embed_type="q3_k", output_type="q6_k", progress=False)
    reader = open_gguf(tmp_path / "out.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q3_K", "Q6_K")
    weights = load_file(str(model / "model.safetensors"))
    for name, source, stock in (("token_embd", "model.embed_tokens", "q3_k"), ("output", "lm_head", "q6_k")):
        w = weights[f"{source}.weight"].float()
        expected = (w + native_error(w, stock)).numpy()
        assert np.array_equal(dequantize_tensor(reader, f"{name}.weight"), expected), name

    narrow = tiny_model_dir(tmp_path / "narrow", "LlamaForCausalLM", demo_dir)  # 128 columns: no 256-wide blocks
    ckpt = _one_tensor_checkpoint(tmp_path / "ck2", narrow, "LlamaForCausalLM", shape=(256, 128))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        export_gguf(ckpt, tmp_path / "narrow.gguf", embed_type="q6_k", progress=False)
    assert any("Q6_K blocks do not divide its rows; stored as Q8_0" in str(w.message) for w in caught)
    assert {t.name: t.tensor_type.name for t in open_gguf(tmp_path / "narrow.gguf").tensors}["token_embd.weight"] == "Q8_0"


def test_unsupported_architecture(tmp_path, demo_dir):
    ckpt = _one_tensor_checkpoint(tmp_path / "ckpt", demo_dir, "GPT2LMHeadModel")
    with pytest.raises(ExportError) as err:  # one of export's errors, for the CLI's one line
        export_gguf(ckpt, tmp_path / "out.gguf")
    assert "GPT2LMHeadModel" in str(err.value)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)
    assert not (tmp_path / "out.gguf").exists()


def test_bad_standard_type(tmp_path, demo_dir):
    ckpt = _one_tensor_checkpoint(tmp_path / "ckpt", demo_dir, "LlamaForCausalLM")
    with pytest.raises(ExportError, match="iq2_xs"):
        export_gguf(ckpt, tmp_path / "out.gguf", embed_type="iq2_xs")


def test_failure_mid_write_leaves_nothing(tiny_models, tmp_path):
    """A float model whose weight data is cut short fails while the tensors are written."""
    broken = tmp_path / "model"
    broken.mkdir()
    for item in tiny_models["llama"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    write_random_checkpoint(tmp_path / "ckpt", broken, 3, 64)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ExportError, match="converter failed: ValueError"):
        export_gguf(tmp_path / "ckpt", out_dir / "x.gguf", progress=False)
    assert list(out_dir.iterdir()) == []


def test_a_full_disk_is_one_line_not_a_traceback(monkeypatch, capsys):
    from slim2gguf import export_child

    def full(job):
        raise OSError("Not enough free space to write 247959552 bytes after offset 5950624")

    monkeypatch.setitem(export_child.JOBS, "convert", full)
    monkeypatch.setattr("sys.argv", ["export_child", "{}"])
    with pytest.raises(SystemExit) as exit_info:
        export_child.main()
    out = capsys.readouterr()
    assert exit_info.value.code == 1 and "Traceback" not in out.err
    assert json.loads(out.out) == {"error": "export failed on the file system: Not enough free space to write 247959552 bytes after offset 5950624"}


def test_interrupt_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    write_random_checkpoint(tmp_path / "ckpt", tiny_models["llama"], 3, 64)

    def interrupted(job: dict, src: Path) -> dict:
        Path(job["out"]).write_bytes(b"GGUF partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("slim2gguf.export._run_child", interrupted)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tmp_path / "ckpt", out_dir / "x.gguf")
    assert list(out_dir.iterdir()) == []


def test_the_child_leaves_ctrl_c_to_its_parent(tiny_models, tmp_path):
    """Ctrl-C reaches the child as well as the parent; the parent kills it and removes the partial
    file, so the child ignores SIGINT from its first statements on (a traceback from it would land
    in the user's terminal under the parent's one-line message). SIGINT every 0.2 s from 0.3 s on,
    through its imports, until it answers. Its output goes to files, which a pipe read only after
    it exits could not take whole (the child would block on a full pipe)."""
    model = tiny_models["llama"]
    src = ensure_source()
    linears = {f"model.layers.0.{name}": shape for name, shape in linear_shapes(json.loads((model / "config.json").read_text())).items()}
    cmd, env = child_command({"kind": "mapping", "model_dir": str(model), "linears": linears, "src": str(src)}, src)
    sent = 0
    with open(tmp_path / "out", "w") as stdout, open(tmp_path / "err", "w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True)
        time.sleep(0.3)
        while proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            sent += 1
            time.sleep(0.2)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0 and "Traceback" not in err, f"exit {proc.returncode} after {sent} signals:\n{err[-2000:]}"
    assert sent >= 3, f"the child answered after {sent} signals: too fast to test"
    assert "blk.0.attn_q.weight" in json.loads(out.splitlines()[-1])["mapping"]
