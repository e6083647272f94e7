"""Sequential quantization of a tiny random LLaMA: determinism, resume, allocation reuse,
evaluation of the stored values, and the documented errors for bad input."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from permissions import run_bound_by_permissions
from rich.console import Console
from write_limits import files_limited_to

from slim2gguf import checkpoint as ckpt_mod
from slim2gguf.checkpoint import Checkpoint, CheckpointError
from slim2gguf.methods import QuantSettings
from slim2gguf.models import ModelError, load_model, load_tokenizer, set_linear_weights
from slim2gguf.paths import model_fingerprint
from slim2gguf.perplexity import perplexity
from slim2gguf.pipeline import Allocation, CalibSettings, load_allocation, quantize_model

SLIM = QuantSettings("slim", 2, 32, sba_tokens=256)


def calib(text: Path) -> CalibSettings:
    return CalibSettings(str(text), nsamples=8, seqlen=64, seed=3)


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def slim_ckpt(tiny_model, tiny_text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "slim"
    quantize_model(str(tiny_model), out, SLIM, calib(tiny_text))
    return out


def test_checkpoint_is_complete_and_self_describing(slim_ckpt):
    ck = Checkpoint(slim_ckpt)
    s = ck.settings
    assert (s["method"], s["bits"], s["group_size"]) == ("slim", 2, 32)
    assert s["calibration"]["nsamples"] == 8
    tensors = dict(ck.tensors())
    assert len(tensors) == 2 * 7
    for name, qt in tensors.items():
        assert qt.bits == 2 and set(qt.widths.tolist()) <= {1, 2, 3}
        assert ck.manifest["tensors"][name]["widths"] == qt.widths.tolist()
    assert "versions" in ck.manifest and len(ck.manifest["blocks"]) == 2
    for block in ck.manifest["blocks"]:  # the SBA search's choice per linear, for inspection
        searches = block["sba_search"]
        assert len(searches) == 7
        for found in searches.values():
            assert found["i"] >= 0 and found["score"] <= found["score_uniform"]
            assert (found["i"] == 0) == (found["score"] == found["score_uniform"])


def test_same_seed_gives_identical_checkpoint(slim_ckpt, tiny_model, tiny_text, tmp_path):
    again = tmp_path / "again"
    quantize_model(str(tiny_model), again, SLIM, calib(tiny_text))
    assert files_of(again) == files_of(slim_ckpt)


def test_blocks_read_one_at_a_time_give_the_same_checkpoint(tiny_model, tiny_text, tmp_path, monkeypatch):
    """The flat-memory path (text_model.BlockLoader: the embedding, then one block at a
    time) against the whole model loaded at once: the same bytes; no more than one block
    is ever read in while quantizing."""
    from slim2gguf import pipeline
    from slim2gguf.text_model import BlockLoader

    loaded: list[str] = []
    original_load, original_release = BlockLoader.load, BlockLoader.release
    monkeypatch.setattr(BlockLoader, "load", lambda self, module: (loaded.append(module), original_load(self, module)))
    monkeypatch.setattr(BlockLoader, "release", lambda self, module: (loaded.remove(module), original_release(self, module)))
    peak: list[int] = []
    monkeypatch.setattr(pipeline, "_run_block", lambda *a, _run=pipeline._run_block: (peak.append(len(loaded)), _run(*a))[1])
    quantize_model(str(tiny_model), tmp_path / "lazy", SLIM, calib(tiny_text))
    monkeypatch.setattr(pipeline, "_open_model", lambda path, whole: (load_model(path), None))
    quantize_model(str(tiny_model), tmp_path / "whole", SLIM, calib(tiny_text))
    assert files_of(tmp_path / "lazy") == files_of(tmp_path / "whole")
    assert peak and max(peak) == 2 and loaded == ["model.embed_tokens"]  # the embedding and one block


def test_resume_after_interruption_matches_uninterrupted(slim_ckpt, tiny_model, tiny_text, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    original = ckpt_mod.CheckpointWriter.write_block

    def write_then_stop(self, index, tensors, info):
        original(self, index, tensors, info)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.CheckpointWriter, "write_block", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(str(tiny_model), out, SLIM, calib(tiny_text))
    assert not out.exists() and (tmp_path / "resumed.partial").exists()
    monkeypatch.setattr(ckpt_mod.CheckpointWriter, "write_block", original)
    report = quantize_model(str(tiny_model), out, SLIM, calib(tiny_text))
    assert report.resumed_from == 1
    assert files_of(out) == files_of(slim_ckpt)


def test_resume_refuses_other_settings(tiny_model, tiny_text, tmp_path):
    partial = tmp_path / "x.partial"
    ckpt_mod.CheckpointWriter(tmp_path / "x", {"method": "gptq"}, 2).write_block(0, {}, {"block": 0})
    assert partial.exists()
    with pytest.raises(CheckpointError, match="other settings"):
        quantize_model(str(tiny_model), tmp_path / "x", SLIM, calib(tiny_text))


def test_ctrl_c_says_whether_work_was_kept(tiny_model, tiny_text, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slim2gguf.cli import app

    original = ckpt_mod.CheckpointWriter.write_block

    def stop_at(block):
        def write(self, index, tensors, info):
            if index == block:
                raise KeyboardInterrupt
            original(self, index, tensors, info)

        return write

    args = ["quantize", str(tiny_model), "-o", str(tmp_path / "c"), "--calib", str(tiny_text), "--nsamples", "8", "--seqlen", "64", "--bits", "2", "--group-size", "32"]
    for block, said in ((0, "before the first block finished: nothing was written"), (1, f"finished work is kept in {tmp_path / 'c'}.partial")):
        monkeypatch.setattr(ckpt_mod.CheckpointWriter, "write_block", stop_at(block))
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 130 and said in " ".join(result.output.split()), result.output
        assert (tmp_path / "c.partial").exists() == (block == 1)


def test_a_run_that_fails_before_its_first_block_leaves_nothing(tiny_model, tiny_text, tmp_path):
    """An empty calibration text stops the run after the model loads: no folder is left that
    would refuse the corrected command as "an interrupted run with other settings"."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "x"
    with pytest.raises(ValueError, match="0 tokens"):
        quantize_model(str(tiny_model), out, SLIM, calib(empty))
    assert not out.exists() and not (tmp_path / "x.partial").exists()
    # a folder with nothing finished, as a run killed before its first block left one, is replaced
    stale = ckpt_mod.CheckpointWriter(out, {"method": "gptq"}, 2).manifest
    (tmp_path / "x.partial" / "blocks").mkdir(parents=True)
    (tmp_path / "x.partial" / "manifest.json").write_text(json.dumps(stale))
    assert quantize_model(str(tiny_model), out, SLIM, calib(tiny_text)).resumed_from == 0
    assert Checkpoint(out).manifest["settings"]["method"] == "slim"


def random_block(layer: int, seed: int = 0) -> dict:
    from export_helpers import random_qtensor

    gen = torch.Generator().manual_seed(seed)
    return {f"model.layers.{layer}.mlp.{n}": random_qtensor(64, 256, 3, 64, gen) for n in ("up_proj", "down_proj")}


def test_a_full_disk_says_what_is_kept_and_the_same_command_resumes(tmp_path):
    """A block that could not be written (disk full) was a SafetensorError traceback, and the
    work folder it left (blocks/, no manifest) refused every later run as "not a checkpoint"."""
    block = random_block(0)
    out, work = tmp_path / "x", tmp_path / "x.partial"
    with files_limited_to(4096), pytest.raises(CheckpointError) as failed, ckpt_mod.CheckpointWriter(out, {"method": "slim"}, 2) as writer:
        writer.write_block(0, block, {"block": 0})
    assert str(failed.value) == f"cannot write block 0 in {work}: File too large; nothing was kept"
    assert not work.exists()
    with ckpt_mod.CheckpointWriter(out, {"method": "slim"}, 2) as writer:
        writer.write_block(0, block, {"block": 0})
        with files_limited_to(4096), pytest.raises(CheckpointError) as failed:
            writer.write_block(1, block, {"block": 1})
    assert str(failed.value).endswith("; its 1 finished block is kept: rerun the same command to resume")
    with ckpt_mod.CheckpointWriter(out, {"method": "slim"}, 2) as writer:
        assert writer.blocks_done == 1
    # a killed run's folder that recorded nothing (a block file, no manifest) is replaced ...
    shutil.rmtree(work)
    (work / "blocks").mkdir(parents=True)
    (work / "blocks" / "block_0000.safetensors").write_bytes(b"half")
    with ckpt_mod.CheckpointWriter(out, {"method": "gptq"}, 2) as writer:
        assert writer.blocks_done == 0 and not work.exists()
    # ... but a folder of that name holding anything else is not removed
    (work / "notes.txt").parent.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is in the way: it holds no manifest.json"):
        ckpt_mod.CheckpointWriter(out, {"method": "slim"}, 2)
    assert (work / "notes.txt").read_text() == "mine"


def test_two_runs_cannot_write_one_work_folder(tmp_path):
    """Two runs of one output at once (other settings, both started before either wrote) wrote
    their blocks and manifests over each other's; the second is refused and the first goes on."""
    out, work = tmp_path / "x", tmp_path / "x.partial"
    refused = f"another slim2gguf run is writing {work}: let it finish, or write to another place"
    with ckpt_mod.CheckpointWriter(out, {"method": "slim"}, 2) as first, ckpt_mod.CheckpointWriter(out, {"method": "gptq"}, 2) as second:
        first.write_block(0, random_block(0), {"block": 0})
        with pytest.raises(CheckpointError, match=re.escape(refused)):
            second.write_block(0, random_block(0, seed=1), {"block": 0})
        with pytest.raises(CheckpointError, match=re.escape(refused)):
            ckpt_mod.CheckpointWriter(out, {"method": "slim"}, 2)
        first.write_block(1, random_block(1), {"block": 1})
        first.finish({})
    done = Checkpoint(out)
    assert done.settings == {"method": "slim"} and sorted(p.name for p in out.rglob("*")) == [
        "block_0000.safetensors", "block_0001.safetensors", "blocks", "manifest.json"]  # fmt: skip
    assert torch.equal(dict(done.tensors())["model.layers.0.mlp.up_proj"].codes, random_block(0)["model.layers.0.mlp.up_proj"].codes)


def test_work_folder_on_a_file_system_without_locks(tmp_path, monkeypatch):
    """flock failing otherwise than "held" (NFS without its lock daemon: ENOLCK) stopped the run
    with an OSError traceback; it goes on unlocked, with one CheckpointWarning."""
    import errno
    import os

    def no_locks(*_args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(ckpt_mod.fcntl, "flock", no_locks)
    out = tmp_path / "x"
    with pytest.warns(ckpt_mod.CheckpointWarning, match=r"cannot lock .*x\.partial \(No locks available\): going on unlocked") as said:
        with ckpt_mod.CheckpointWriter(out, {"method": "slim"}, 2) as writer:
            writer.write_block(0, random_block(0), {"block": 0})
            writer.write_block(1, random_block(1), {"block": 1})
            writer.finish({})
    assert len(said) == 1 and Checkpoint(out).manifest["blocks_done"] == 2


def test_the_model_path_is_kept_absolute(tiny_model, tiny_text, tmp_path, monkeypatch):
    """A model named relative to where quantize ran was kept as given: export from another
    folder said "the checkpoint's float model tiny is gone"."""
    monkeypatch.chdir(tiny_model.parent)
    out = tmp_path / "rel"
    quantize_model(tiny_model.name, out, QuantSettings("rtn", 3, 32), calib(tiny_text))
    assert Checkpoint(out).settings["model_path"] == str(tiny_model.resolve())


def test_allocation_round_trip(slim_ckpt, tiny_model, tiny_text, tmp_path):
    alloc = load_allocation(slim_ckpt / "manifest.json")
    out = tmp_path / "reused"
    quantize_model(str(tiny_model), out, SLIM, CalibSettings(str(tiny_text), 8, 64, seed=99), allocation=alloc)
    assert Checkpoint(out).allocation() == Checkpoint(slim_ckpt).allocation()
    assert all("sba_search" not in block for block in Checkpoint(out).manifest["blocks"])  # no search ran
    widths = dict(alloc.widths)
    name = next(iter(widths))
    widths[name] = [3] * (len(widths[name]) - 1) + [2]
    bad = Allocation(widths, alloc.group_sizes)
    with pytest.raises(ValueError, match="average"):
        quantize_model(str(tiny_model), tmp_path / "bad", SLIM, calib(tiny_text), allocation=bad)


def _reused(model: Path, out: Path, quant: QuantSettings, settings: CalibSettings, allocation: Allocation | None = None) -> bool:
    console = Console(record=True, width=400)
    quantize_model(str(model), out, quant, settings, allocation=allocation, console=console)
    return "reused, nothing quantized again" in console.export_text()


def test_a_finished_checkpoint_is_reused_only_for_the_same_inputs(slim_ckpt, tiny_model, tiny_text, tmp_path):
    """The checkpoint of a run is reused by a rerun with the same settings, but not once the
    calibration file's words, the allocation's widths or the model's files changed: they
    kept the old run's output, as only their names were compared."""
    text = tmp_path / "calib.txt"
    shutil.copy(tiny_text, text)
    out, gptq = tmp_path / "ck", QuantSettings("gptq", 3, 32)
    assert not _reused(tiny_model, out, gptq, calib(text))
    assert _reused(tiny_model, out, gptq, calib(text))
    text.write_text(" ".join(reversed(tiny_text.read_text().split())))
    assert not _reused(tiny_model, out, gptq, calib(text))

    alloc = load_allocation(slim_ckpt / "manifest.json")
    assert not _reused(tiny_model, out, SLIM, calib(text), alloc)
    assert _reused(tiny_model, out, SLIM, calib(text), alloc)
    widths = dict(alloc.widths)
    name = next(iter(widths))
    widths[name] = [3, 1] * (len(widths[name]) // 2)
    assert not _reused(tiny_model, out, SLIM, calib(text), Allocation(widths, alloc.group_sizes))
    assert Checkpoint(out).allocation()[name] == widths[name]

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert not _reused(model, out, gptq, calib(text))
    config = model / "config.json"
    config.write_text(config.read_text() + "\n")
    assert not _reused(model, out, gptq, calib(text))


def test_an_allocation_is_checked_whole_before_the_first_block(slim_ckpt, tiny_model, tiny_text, tmp_path):
    """A wrong group count in the last block was found after the first block's work, and left
    a .partial; names the model lacks were ignored; a plain {name: [widths]} made at another
    group size names the one to give."""
    alloc = load_allocation(slim_ckpt / "manifest.json")
    widths = dict(alloc.widths)
    last = sorted(widths)[-1]
    widths[last] = widths[last][:-2]
    out = tmp_path / "ck"
    with pytest.raises(ValueError, match=f"allocation for {re.escape(last)} has {len(widths[last])} groups"):
        quantize_model(str(tiny_model), out, SLIM, calib(tiny_text), allocation=Allocation(widths, alloc.group_sizes))
    assert not out.exists() and not ckpt_mod.partial_dir(out).exists()
    foreign = Allocation({**alloc.widths, "model.layers.9.mlp.down_proj": [3, 3]}, alloc.group_sizes)
    with pytest.raises(ValueError, match=r"widths to model.layers.9.mlp.down_proj, which this model lacks \(1 of its \d+ names\): was it made for another model\?"):
        quantize_model(str(tiny_model), out, SLIM, calib(tiny_text), allocation=foreign)
    plain = Allocation(dict(alloc.widths))  # no group sizes: the run's (128) applies
    with pytest.raises(ValueError, match="groups, 1 at group size 128: add --group-size 32"):
        quantize_model(str(tiny_model), out, replace(SLIM, group_size=128), calib(tiny_text), allocation=plain)


@pytest.mark.parametrize("classes", [("attn_qkv",), ("attn_qkv", "ffn_down")])
def test_tensors_naming_a_class_the_model_lacks_is_refused(tiny_model, tiny_text, tmp_path, classes):
    """A class the model lacks quantized nothing of it: alone, a run with no quantized tensor
    that then said to rerun to export it, and left a checkpoint."""
    out = tmp_path / "ck"
    with pytest.raises(ValueError, match="--tensors attn_qkv: this model has no such linears; its classes are attn_k, attn_output"):
        quantize_model(str(tiny_model), out, QuantSettings("gptq", 3, 32, tensors=classes), calib(tiny_text))
    assert not out.exists() and not ckpt_mod.partial_dir(out).exists()


def test_calibration_windows_longer_than_the_models_context_are_refused(tiny_model, tiny_text, tmp_path):
    """They were accepted: positions past the context calibrate on states the model never makes."""
    out = tmp_path / "ck"
    with pytest.raises(ValueError, match=r"--seqlen 513 is longer than the model's context \(512 tokens\): give --seqlen 512 or less"):
        quantize_model(str(tiny_model), out, QuantSettings("gptq", 3, 32), CalibSettings(str(tiny_text), nsamples=2, seqlen=513, seed=0))
    assert not out.exists()
    quantize_model(str(tiny_model), out, QuantSettings("rtn", 3, 32), CalibSettings(str(tiny_text), nsamples=2, seqlen=513, seed=0))


def test_export_refuses_a_checkpoint_whose_model_changed(tiny_model, tiny_text, tmp_path):
    """Export read the embedding, norms and tokenizer from the model folder as it is now, beside
    linears quantized from its old weights."""
    from slim2gguf.export import ExportError, export_gguf

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "ck"
    quantize_model(str(model), out, QuantSettings("rtn", 3, 32), calib(tiny_text))
    kept = model_fingerprint(model)
    (model / "README.md").write_text("notes")  # files export does not read: a GGUF written beside the weights was refused
    (model / "model-q4.gguf").write_bytes(b"GGUF")
    assert model_fingerprint(model) == kept
    config = model / "config.json"
    config.write_text(config.read_text() + "\n")
    with pytest.raises(ExportError, match="changed since it was quantized \\(its files' sizes or times, or the import that made it from a GGUF file\\): quantize again"):
        export_gguf(out, tmp_path / "o.gguf", progress=False)
    assert not (tmp_path / "o.gguf").exists()


def test_eval_uses_stored_values(slim_ckpt, tiny_model, tiny_text):
    model = load_model(tiny_model)
    tok = load_tokenizer(tiny_model)
    text = tiny_text.read_text()
    base = perplexity(model, tok, text, ctx=64, chunks=4)
    set_linear_weights(model, {n: qt.dequantize() for n, qt in Checkpoint(slim_ckpt).tensors()})
    quant = perplexity(model, tok, text, ctx=64, chunks=4)
    assert base.tokens_scored == quant.tokens_scored == 4 * 31
    assert quant.ppl != base.ppl
    layer = model.model.layers[1].mlp.down_proj.weight
    stored = dict(Checkpoint(slim_ckpt).tensors())["model.layers.1.mlp.down_proj"].dequantize()
    assert torch.equal(layer, stored)


def test_kl_divergence_to_a_reference_model(slim_ckpt, tiny_model, tiny_text):
    """Against itself a model is 0 nats away; the quantized one is not, and the float
    perplexity reported beside it is the reference's own."""
    tok, text = load_tokenizer(tiny_model), tiny_text.read_text()
    reference, model = load_model(tiny_model), load_model(tiny_model)
    base = perplexity(reference, tok, text, ctx=64, chunks=4)
    same = perplexity(model, tok, text, ctx=64, chunks=4, reference=reference)
    assert abs(same.kld) < 1e-6 and same.reference_ppl == pytest.approx(base.ppl, rel=1e-6)
    set_linear_weights(model, {n: qt.dequantize() for n, qt in Checkpoint(slim_ckpt).tensors()})
    quant = perplexity(model, tok, text, ctx=64, chunks=4, reference=reference)
    assert quant.kld > 1e-4 and quant.reference_ppl == pytest.approx(base.ppl, rel=1e-6)
    assert base.kld is None and base.reference_ppl is None


def test_full_method_scores_every_position(tiny_model, tiny_text):
    model = load_model(tiny_model)
    res = perplexity(model, load_tokenizer(tiny_model), tiny_text.read_text(), ctx=64, chunks=2, method="full")
    assert res.tokens_scored == 2 * 63


def test_missing_model_dir(tmp_path, tiny_text):
    with pytest.raises(ModelError, match="no model directory"):
        quantize_model(str(tmp_path / "nope"), tmp_path / "o", SLIM, calib(tiny_text))


def test_unknown_architecture(tiny_model, tiny_text, tmp_path):
    other = tmp_path / "gpt"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="not supported; supported: .*LlamaForCausalLM"):
        quantize_model(str(other), tmp_path / "o", SLIM, calib(tiny_text))


def test_non_dividing_shape(tiny_text, tmp_path, monkeypatch):
    """Refused from the config's shapes, before any weight loads."""
    from conftest import make_tiny_model

    from slim2gguf import pipeline

    odd = make_tiny_model(tmp_path / "odd", hidden=96, layers=1)
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("weights loaded before the shape check"))
    with pytest.raises(ValueError, match="use --group-size 32"):
        quantize_model(str(odd), tmp_path / "o", QuantSettings("gptq", 3, 64), calib(tiny_text))


def test_corrupt_manifest(slim_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(slim_ckpt, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpoint(broken)
    (broken / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a slim2gguf-checkpoint"):
        Checkpoint(broken)


def test_truncated_block_file(slim_ckpt, tmp_path):
    broken = tmp_path / "trunc"
    shutil.copytree(slim_ckpt, broken)
    block = broken / "blocks" / "block_0001.safetensors"
    block.write_bytes(block.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="missing or corrupt"):
        dict(Checkpoint(broken).tensors())


def test_a_block_file_that_may_not_be_read_says_so(slim_ckpt, tmp_path):
    """safetensors reported a block without read permission as "No such file or directory"."""
    ckpt = tmp_path / "ck"
    shutil.copytree(slim_ckpt, ckpt)
    block = ckpt / "blocks" / "block_0001.safetensors"
    block.chmod(0)
    code = "import sys; from slim2gguf.checkpoint import Checkpoint\ndict(Checkpoint(sys.argv[1]).tensors())"
    result = run_bound_by_permissions(code, str(ckpt))
    assert result.returncode != 0 and result.stderr.strip().endswith(f"CheckpointError: {block} is missing or corrupt: Permission denied"), result.stderr


def test_refit_setting_reaches_the_quantizer(slim_ckpt, tiny_model, tiny_text, tmp_path):
    """Block 0 sees the same inputs either way: same codes, the scales re-solved only with refit."""
    out = tmp_path / "plain"
    quantize_model(str(tiny_model), out, QuantSettings("slim", 2, 32, sba_tokens=256, refit=False), calib(tiny_text))
    plain, refit = dict(Checkpoint(out).tensors()), dict(Checkpoint(slim_ckpt).tensors())
    assert Checkpoint(out).settings["refit"] is False and Checkpoint(slim_ckpt).settings["refit"] is True
    block0 = [n for n in refit if n.startswith("model.layers.0.")]
    assert all(torch.equal(plain[n].codes, refit[n].codes) for n in block0)
    assert any(not torch.equal(plain[n].d, refit[n].d) for n in block0)


def test_self_generated_calibration_is_deterministic(tiny_model):
    from slim2gguf.calib import self_generated

    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    a = self_generated(model, tok, nsamples=3, seqlen=16, seed=5, batch=2)
    heard: list[int] = []
    b = self_generated(model, tok, nsamples=3, seqlen=16, seed=5, batch=2, on_tokens=heard.append)
    assert a.shape == (3, 16) and torch.equal(a, b)  # counting the steps changes no sample
    assert heard == [2] * 15 + [1] * 15  # every step of each batch: what the progress bar shows


def test_self_calibration_shows_progress(tiny_model, tmp_path):
    """Sampling the calibration text from the model took minutes on a CPU without a word."""
    from rich.console import Console

    console = Console(record=True, width=120, force_terminal=False)
    quantize_model(str(tiny_model), tmp_path / "ck", QuantSettings("gptq", 3, 32), CalibSettings("self", 3, 16, seed=5), console=console)
    assert "calibration: sampling tokens from the model: 45/45" in console.export_text()


def test_tensor_selection_quantizes_only_that_class(slim_ckpt, tiny_model, tiny_text, tmp_path):
    out = tmp_path / "down"
    quantize_model(str(tiny_model), out, QuantSettings("slim", 2, 32, sba_tokens=256, tensors=("ffn_down",)), calib(tiny_text))
    ck = Checkpoint(out)
    assert ck.settings["tensors"] == ["ffn_down"]
    selected = dict(ck.tensors())
    assert sorted(selected) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # the other linears stay float in calibration too: block 1 sees block 0's output with
    # only down_proj quantized, not the all-linears run's, so its weights come out otherwise
    everything = dict(Checkpoint(slim_ckpt).tensors())
    first, second = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    assert torch.equal(selected[first].dequantize(), everything[first].dequantize())  # same float inputs
    assert not torch.equal(selected[second].dequantize(), everything[second].dequantize())


def test_tensor_selection_checks_only_selected_shapes(tiny_text, tmp_path):
    from conftest import make_tiny_model

    odd = make_tiny_model(tmp_path / "odd", hidden=96, layers=1)  # ffn_down has 192 inputs
    quantize_model(str(odd), tmp_path / "o", QuantSettings("gptq", 3, 64, tensors=("ffn_down",)), calib(tiny_text))
    assert list(dict(Checkpoint(tmp_path / "o").tensors())) == ["model.layers.0.mlp.down_proj"]


def test_tensor_classes_parse_and_validate():
    from slim2gguf.architectures import parse_tensor_classes

    assert parse_tensor_classes("ffn_down, attn_v,ffn_down") == ("attn_v", "ffn_down")
    for bad in ("", "ffn_dwn", "attn_q,output"):
        with pytest.raises(ValueError, match="--tensors takes a comma-separated list of attn_q"):
            parse_tensor_classes(bad)
    with pytest.raises(ValueError, match="non-empty selection"):
        QuantSettings("slim", 3, 64, tensors=("lm_head",))
