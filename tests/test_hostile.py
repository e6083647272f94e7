"""Hostile and malformed inputs: every command answers with one line and exit code 2,
never a traceback, whatever the bytes of a GGUF file, checkpoint manifest, allocation
JSON or calibration file. Targeted cases first, then property-based mutations."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from export_helpers import random_qtensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from slim2gguf import format as fmt
from slim2gguf.calib import read_text
from slim2gguf.cli import app

RUNNER = CliRunner()


def run_cli(*args: str):
    result = RUNNER.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{' '.join(map(str, args))} raised {result.exception!r}:\n{result.output}")
    assert "Traceback" not in result.output
    return result


def assert_refused(result, *words: str) -> None:
    """Exit code 2 and one line of error, the last thing printed (after any progress)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    for word in words:
        assert word in errors[0], errors[0]


def write_gguf(path: Path, kvs: dict | None = None, rows: int = 64, stype: fmt.SlimType | None = None) -> Path:
    """A small GGUF with one SliM tensor (``rows`` rows; 0 allowed) and one F32 tensor."""
    fmt.register_gguf_types()
    stype = stype or fmt.slim_type(3, 64)
    writer = gguf.GGUFWriter(path, arch="llama")
    for key, value in (kvs or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    packed = random_qtensor(max(rows, 1), 128, stype.bits, stype.group_size, torch.Generator().manual_seed(0)).pack()[:rows]
    writer.add_tensor("blk.0.ffn_up.weight", packed, raw_shape=(rows, packed.shape[1]), raw_dtype=gguf.GGMLQuantizationType(stype.type_id))
    writer.add_tensor("output_norm.weight", np.ones(128, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_inspect_of_a_file_with_no_tensors(tmp_path):
    """A GGUF may hold no tensors (the tensor count's first byte zeroed, as a fuzzed file found):
    the keys and a zero total, no bits per weight to divide out."""
    raw = bytearray(write_gguf(tmp_path / "a.gguf", {"general.file_type": 1004}).read_bytes())
    raw[8] = 0  # n_tensors (uint64 after magic and version): 2 -> 0
    path = tmp_path / "none.gguf"
    path.write_bytes(bytes(raw))
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert "general.file_type = 1004 (SLIM3_G64)" in result.output
    assert "0 tensors: 0 parameters, 0 bytes of data\n" in result.output


def test_inspect_of_a_stock_tensor_with_no_elements(tmp_path):
    """A zero dimension is legal for a stock tensor: its row shows no bpw, the totals count the rest."""
    fmt.register_gguf_types()
    path = tmp_path / "empty_f32.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(0, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(128, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert "2 tensors: 128 parameters, 512 bytes of data, 32.000 bpw" in result.output


def test_inspect_with_a_string_file_type(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", {"general.file_type": "SLIM3_G64"})
    result = run_cli("inspect", path)
    assert result.exit_code == 0 and "general.file_type = SLIM3_G64" in result.output


def test_inspect_writes_a_files_control_characters_as_escapes(tmp_path):
    """A name holding a terminal escape went to the terminal as it was (colours changed, or worse)."""
    path = write_gguf(tmp_path / "a.gguf", {"general.name": "boom\x1b[31m red\x07"})
    result = run_cli("inspect", path)
    assert result.exit_code == 0 and "general.name = boom\\x1b[31m red\\x07\n" in result.output, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output


def test_inspect_with_a_string_key_that_is_not_utf8(tmp_path):
    raw = bytearray(write_gguf(tmp_path / "u.gguf").read_bytes())
    at = raw.index(b"llama")
    raw[at] = 0x80
    (tmp_path / "u.gguf").write_bytes(bytes(raw))
    assert_refused(run_cli("inspect", tmp_path / "u.gguf"), "general.architecture", "corrupt")


def test_inspect_with_a_zero_row_slim_tensor(tmp_path):
    result = run_cli("inspect", write_gguf(tmp_path / "z.gguf", rows=0))
    assert_refused(result, "blk.0.ffn_up.weight", "no rows")


def test_validate_with_a_string_bits_key(tmp_path, tiny_model, tiny_text):
    path = write_gguf(tmp_path / "b.gguf", {"slim2gguf.bits": "three"})
    result = run_cli("validate", path, "--model", tiny_model, "--text", tiny_text)
    assert_refused(result, "slim2gguf.bits")


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    path = write_gguf(tmp_path_factory.mktemp("g") / "s.gguf", {"general.file_type": 1004, "slim2gguf.bits": 3})
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_inspect_never_crashes_on_mutated_files(small_gguf, tmp_path, data):
    raw = bytearray(small_gguf)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(raw[:cut]))
    result = run_cli("inspect", path)
    assert result.exit_code in (0, 2)
    if result.exit_code == 2:
        assert_refused(result)


# --- checkpoints, manifests, allocations, calibration files -------------------------------


@pytest.fixture(scope="module")
def gptq_ckpt(tiny_model, tiny_text, tmp_path_factory) -> Path:
    from slim2gguf.methods import QuantSettings
    from slim2gguf.pipeline import CalibSettings, quantize_model

    out = tmp_path_factory.mktemp("ck") / "gptq"
    quantize_model(str(tiny_model), out, QuantSettings("gptq", 3, 32), CalibSettings(str(tiny_text), 4, 32, seed=0))
    return out


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _replace(node, path, value):
    if not path:
        return value
    node[path[0]] = _replace(node[path[0]], path[1:], value)
    return node


def test_eval_refuses_a_manifest_whose_settings_lost_the_group_size(gptq_ckpt, tiny_model, tiny_text, tmp_path):
    """The case hypothesis found (a KeyError): where every entry names its group size the
    checkpoint is read; where none does, it is refused in one line."""
    broken = tmp_path / "ck"
    shutil.copytree(gptq_ckpt, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["settings"] = {}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("eval", tiny_model, "--checkpoint", broken, "--text", tiny_text, "--chunks", "1", "--ctx", "32")
    assert result.exit_code == 0, result.output
    for meta in manifest["tensors"].values():
        meta.pop("group_size", None)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("eval", tiny_model, "--checkpoint", broken, "--text", tiny_text, "--chunks", "1", "--ctx", "32")
    assert_refused(result, "names no group size")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_eval_never_crashes_on_mutated_manifests(gptq_ckpt, tiny_model, tiny_text, tmp_path, data):
    broken = tmp_path / "ck"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(gptq_ckpt, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    places = [p for p, _ in _paths(manifest) if len(p) <= 4]
    path = data.draw(st.sampled_from(places))
    manifest = _replace(manifest, path, data.draw(JSON_VALUES))
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("eval", tiny_model, "--checkpoint", broken, "--text", tiny_text, "--chunks", "1", "--ctx", "32")
    if result.exit_code != 0:
        assert_refused(result)


@pytest.mark.parametrize(
    "content",
    ["{", "[]", '{"model.layers.0.mlp.up_proj": "x"}', '{"tensors": 3}', '{"tensors": {"a": {}}}',
     '{"model.layers.0.mlp.up_proj": [3, "x"]}', '{"model.layers.0.mlp.up_proj": [9, 9, 9, 9]}', "\x00\xff"],
)  # fmt: skip
def test_quantize_refuses_bad_allocation_files(tiny_model, tiny_text, tmp_path, content):
    bad = tmp_path / "alloc.json"
    bad.write_bytes(content.encode("latin-1"))
    result = run_cli("quantize", tiny_model, "-o", tmp_path / "o", "--calib", tiny_text, "--nsamples", "2",
                     "--seqlen", "32", "--allocation", bad)  # fmt: skip
    assert_refused(result)


@pytest.mark.parametrize(
    ("name", "content"),
    [("c.txt", b"\xff\xfe\x00garbage\x80"), ("c.txt", b""), ("c.jsonl", b"{not json\n"), ("c.jsonl", b'{"other": 1}\n'),
     ("c.parquet", b"PAR1 not really"), ("c.json", b"[1, 2, 3]")],
)  # fmt: skip
def test_quantize_refuses_bad_calibration_files(tiny_model, tmp_path, name, content):
    calib = tmp_path / name
    calib.write_bytes(content)
    result = run_cli("quantize", tiny_model, "-o", tmp_path / "o", "--calib", calib, "--nsamples", "2", "--seqlen", "32")
    assert_refused(result)


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [("c.txt", gzip.compress(b"text " * 5000), "is not UTF-8 text (byte 1 is not)"),  # read as text, bad bytes replaced
     ("c.md", "caf\xe9 ".encode("latin-1") * 5000, "is not UTF-8 text (byte 3 is not)"),
     ("c.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n', "is not valid JSON Lines: line 3: Expecting property name enclosed in double quotes at column 14"),
     ("c.jsonl", b'{"text": "a", "n": ' + b"1" * 5000 + b"}\n", "line 1: a number has more digits than Python reads (4300)"),
     ("c.json", b"[" * 100_000 + b"]" * 100_000, "is not valid JSON: nested too deeply to read")],
)  # fmt: skip
def test_calibration_files_that_are_no_utf8_text_or_json_are_named(tiny_model, tmp_path, name, content, said):
    """Binary and other-encoding files were read as text with their bad bytes replaced; JSON
    Lines errors gave each line's own position ("line 1") or Python's advice to programmers."""
    calib = tmp_path / name
    calib.write_bytes(content)
    result = run_cli("quantize", tiny_model, "-o", tmp_path / "o", "--calib", calib, "--nsamples", "2", "--seqlen", "32")
    assert_refused(result, said)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "with a byte order mark"}\n')
    assert read_text(str(bom)) == "with a byte order mark"


@pytest.mark.parametrize(
    ("content", "said"),
    [(b'{"a": ' + b"1" * 5000 + b"}", "cannot be read as JSON: a number has more digits than Python reads (4300)"),
     (b"[" * 100_000 + b"]" * 100_000, "cannot be read as JSON: nested too deeply to read"),
     ("{\"caf\xe9\": [3]}".encode("latin-1"), "is not UTF-8 text (byte 5 is not), as JSON must be")],
)  # fmt: skip
def test_allocation_files_that_are_no_json_are_named(tiny_model, tiny_text, tmp_path, content, said):
    bad = tmp_path / "alloc.json"
    bad.write_bytes(content)
    result = run_cli("quantize", tiny_model, "-o", tmp_path / "o", "--calib", tiny_text, "--allocation", bad)
    assert_refused(result, said)


def test_a_hub_dataset_out_of_reach_is_one_line(tiny_model, tiny_text, tmp_path):
    """--calib wikitext2 (and eval's --text wikitext2) offline: datasets' ConnectionError was a
    traceback. A real load, in a child with an empty Hugging Face cache and the hub off."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for args in (["quantize", tiny_model, "-o", tmp_path / "o", "--calib", "wikitext2"], ["eval", tiny_model, "--text", "wikitext2"]):
        result = subprocess.run([sys.executable, "-m", "slim2gguf", *map(str, args)], env=env, capture_output=True, text=True)
        said = (result.stdout + result.stderr).strip().splitlines()
        assert result.returncode == 2 and len(said) == 1, said
        assert said[0].startswith("error: could not load the wikitext dataset from the Hugging Face hub (offline?): "), said
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# --- failure paths of convert; export of a finished checkpoint ----------------------------


@pytest.fixture(scope="module")
def convertible(tmp_path_factory) -> Path:
    """A tiny LLaMA with the demo model's tokenizer, which llama.cpp's converter accepts."""
    from export_helpers import tiny_model_dir

    from slim2gguf.named_models import demo_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("conv") / "llama", "LlamaForCausalLM", demo_model_dir())


def convert_args(model: Path, out: Path, text: Path, *extra: str) -> list:
    return ["convert", model, "-o", out, "--method", "gptq", "--group-size", "32", "--calib", text,
            "--nsamples", "2", "--seqlen", "32", "--checkpoint", out.with_suffix(".ckpt"), *extra]  # fmt: skip


def test_convert_into_a_fresh_cache(convertible, tiny_text, tmp_path, monkeypatch):
    """Without --checkpoint the work goes to the cache's checkpoints/ folder, which a fresh cache
    does not have yet; after the export nothing of it stays."""
    from slim2gguf import llamacpp

    monkeypatch.setenv("LLAMA_CPP_DIR", str(llamacpp.ensure_source()))
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o.gguf"
    args = convert_args(convertible, out, tiny_text)
    result = run_cli(*args[: args.index("--checkpoint")])
    assert result.exit_code == 0, result.output
    assert out.is_file() and list((tmp_path / "cache" / "checkpoints").iterdir()) == []


def test_convert_without_llama_cpp_source_stops_before_quantizing(convertible, tiny_text, tmp_path, monkeypatch):
    from slim2gguf import llamacpp, pipeline

    def unreachable():
        raise llamacpp.LlamaCppError("no git host and no sdist")

    monkeypatch.setattr(llamacpp, "ensure_source", unreachable)
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("quantized before checking the export"))
    result = run_cli(*convert_args(convertible, tmp_path / "o.gguf", tiny_text))
    assert_refused(result, "llama.cpp's source", "no git host")


def test_cholesky_failure_is_one_line(tiny_model, tiny_text, tmp_path, monkeypatch):
    def not_positive(*_args, **_kwargs):
        raise torch.linalg.LinAlgError("not positive-definite")

    monkeypatch.setattr(torch.linalg, "cholesky", not_positive)
    result = run_cli("quantize", tiny_model, "-o", tmp_path / "o", "--method", "gptq", "--group-size", "32",
                     "--calib", tiny_text, "--nsamples", "2", "--seqlen", "32")  # fmt: skip
    assert_refused(result, "raise --damp")


def damaged_copy(model: Path, into: Path, tensor: str, value: float) -> Path:
    """``model`` with one weight of ``tensor`` set to ``value`` (NaN or infinity)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, into)
    (shard,) = into.glob("*.safetensors")
    tensors = load_file(shard)
    tensors[tensor].view(-1)[-7] = value  # in the last rows: the last slice check_unread reads
    save_file(tensors, shard, metadata={"format": "pt"})
    return into


@pytest.mark.parametrize(("tensor", "value", "calib"), [
    ("model.layers.1.mlp.down_proj.weight", float("nan"), "text"),  # read block by block, after block 0 is quantized
    ("lm_head.weight", float("nan"), "text"),  # never read block by block: the exporter copies it
    ("model.norm.weight", float("-inf"), "text"),
    ("model.embed_tokens.weight", float("inf"), "self"),  # self-generated calibration: the model is read whole
])  # fmt: skip
def test_a_damaged_weight_is_refused_by_name(convertible, tiny_text, tmp_path, monkeypatch, tensor, value, calib):
    """A NaN or infinite weight stops the run with one line naming it, before it can reach a
    file (or end in a Cholesky failure that blames the damping)."""
    from slim2gguf import text_model

    monkeypatch.setattr(text_model, "CHECK_ELEMENTS", 1 << 16)  # the head (49152 x 128) is then read in slices
    damaged = damaged_copy(convertible, tmp_path / "damaged", tensor, value)
    out = tmp_path / "o.gguf"
    args = convert_args(damaged, out, tiny_text)
    if calib == "self":
        args[args.index("--calib") + 1] = "self"
    result = run_cli(*args)
    assert_refused(result, tensor, "NaN or infinite")
    assert not out.exists()


def test_interrupted_export_then_rerun_only_exports(convertible, tiny_text, tmp_path, monkeypatch):
    from slim2gguf import export, pipeline

    out = tmp_path / "o.gguf"
    real_export = export.export_gguf

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    def failed(*_args, **_kwargs):  # e.g. a full disk: the checkpoint stayed in the cache, unmentioned
        raise export.ExportError("cannot write o.gguf: No space left on device")

    monkeypatch.setattr(export, "export_gguf", failed)
    assert_refused(run_cli(*convert_args(convertible, out, tiny_text)), "No space left on device; the quantized checkpoint in", "is kept: rerun")
    monkeypatch.setattr(export, "export_gguf", interrupted)
    first = run_cli(*convert_args(convertible, out, tiny_text))
    assert first.exit_code == 130 and "exports without quantizing again" in first.output and not out.exists()
    monkeypatch.setattr(export, "export_gguf", real_export)
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("quantized again"))
    second = run_cli(*convert_args(convertible, out, tiny_text))
    assert second.exit_code == 0, second.output
    assert "reused, nothing quantized again" in second.output and out.stat().st_size > 0

    again = tmp_path / "again.gguf"
    third = run_cli("export", out.with_suffix(".ckpt"), "-o", again)
    assert third.exit_code == 0, third.output
    assert again.read_bytes() == out.read_bytes()
    assert_refused(run_cli("export", tmp_path / "nothing", "-o", tmp_path / "x.gguf"), "no checkpoint at")


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_checkpoint_never_replaces_what_is_not_one(tiny_model, tiny_text, tmp_path, monkeypatch):
    """quantize -o MODEL_FOLDER quantized, then renamed the model folder away and deleted it;
    any folder of the user's went the same way, and so did an unrelated X.old beside X. Now
    they are refused before anything loads, and only an older checkpoint is ever replaced."""
    from slim2gguf import models

    monkeypatch.setattr(models, "load_model", lambda *_: pytest.fail("the model loaded"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    before = {folder: tree(folder) for folder in (model, mine)}
    for out in (model, mine):
        assert_refused(run_cli("quantize", tiny_model, "-o", out), "holds files that are not a slim2gguf checkpoint")
    monkeypatch.chdir(mine)
    for out in (".", "..", "/"):
        assert_refused(run_cli("quantize", tiny_model, "-o", out), "names no new folder")
    assert {folder: tree(folder) for folder in (model, mine)} == before


def test_finishing_a_checkpoint_keeps_the_users_folders(gptq_ckpt, tmp_path):
    """finish renamed an older X to X.old and deleted X.old: a folder of the user's by that name
    was deleted even when there was no X; a target that is no checkpoint is refused as well."""
    from slim2gguf.checkpoint import Checkpoint, CheckpointError, CheckpointWriter

    out = tmp_path / "x"
    (tmp_path / "x.old").mkdir()
    (tmp_path / "x.old" / "b").write_text("mine")
    for _ in range(2):  # made, then an older checkpoint replaced
        with CheckpointWriter(out, {"method": "rtn"}, 1) as writer:
            writer.write_block(0, {}, {"block": 0})
            writer.finish({})
        assert Checkpoint(out).settings == {"method": "rtn"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "x.old"] and (tmp_path / "x.old" / "b").read_text() == "mine"
    users = tmp_path / "users"
    with CheckpointWriter(users, {"method": "rtn"}, 1) as writer:
        writer.write_block(0, {}, {"block": 0})
        users.mkdir()
        (users / "data.bin").write_bytes(b"1")
        with pytest.raises(CheckpointError, match="is not a slim2gguf checkpoint: it is not replaced"):
            writer.finish({})
    assert tree(users) == {"data.bin": b"1"}


def test_a_gguf_output_never_overwrites_an_input_or_a_device(gptq_ckpt, convertible, tiny_text, tmp_path):
    """export -o CKPT/manifest.json wrote the file over the manifest, convert -o MODEL.gguf or
    -o MODEL/model.safetensors over the model, convert --checkpoint X -o X failed after
    quantizing, and -o /dev/null replaced the device with a file; all refused before any work."""
    ckpt = tmp_path / "ck"
    shutil.copytree(gptq_ckpt, ckpt)
    model = tmp_path / "model"
    shutil.copytree(convertible, model)
    gguf_model = write_gguf(tmp_path / "m.gguf")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    before = {folder: tree(folder) for folder in (ckpt, model)}
    assert_refused(run_cli("export", ckpt, "-o", ckpt / "manifest.json"), "which this command reads")
    assert_refused(run_cli("export", ckpt, "-o", pipe), "is not a regular file")
    for out, extra in (
        (model / "model.safetensors", ()),
        (gguf_model, ()),
        (tmp_path / "same", ("--checkpoint", tmp_path / "same")),
    ):
        source = gguf_model if out == gguf_model else model
        assert_refused(run_cli(*convert_args(source, out, tiny_text)[:-2], *(extra or ("--checkpoint", tmp_path / "c"))), "which this command reads")
    assert {folder: tree(folder) for folder in (ckpt, model)} == before and pipe.is_fifo()


@pytest.mark.parametrize("damage", ["config not json", "weights missing", "weights cut short"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])  # block by block, and loaded whole (--calib self)
def test_a_broken_model_folder_is_one_line(tiny_model, tiny_text, tmp_path, damage, method):
    """transformers' OSError and safetensors' SafetensorError went through as tracebacks."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    if damage == "config not json":
        (model / "config.json").write_text("{x")
    elif damage == "weights missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:100_000])
    calib = ["--calib", tiny_text] if method == "rtn" else []
    said = {"config not json": "cannot read", "weights missing": "cannot load the model in", "weights cut short": "cannot read"}[damage]
    result = run_cli("quantize", model, "-o", tmp_path / "ck", "--method", method, "--group-size", "32", "--nsamples", "2", "--seqlen", "32", *calib)
    assert_refused(result, said)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck.partial").exists()


def test_an_unreadable_text_is_one_line(tiny_model, tmp_path):
    """A text file that cannot be read (no permission; here a read that fails with EIO, which
    root meets too) was an OSError traceback in eval and validate (one reader) and in
    quantize's --calib."""
    unreadable = tmp_path / "text.txt"
    unreadable.symlink_to("/proc/self/mem")  # a regular file whose first bytes cannot be read
    for args in (
        ("eval", tiny_model, "--text", unreadable),
        ("quantize", tiny_model, "-o", tmp_path / "ck", "--method", "gptq", "--group-size", "32", "--calib", unreadable),
    ):
        assert_refused(run_cli(*args), f"cannot read {unreadable}: Input/output error")


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [("architecture", "FooForCausalLM", "architecture 'FooForCausalLM' is not supported"),
     ("model_path", 5, "settings.model_path is not a string"), ("architecture", None, "settings.architecture is not a string")],
)  # fmt: skip
def test_export_refuses_an_edited_manifest_in_one_line(gptq_ckpt, tmp_path, key, value, said):
    """An unsupported architecture or a model path that is no string were tracebacks in export."""
    broken = tmp_path / "ck"
    shutil.copytree(gptq_ckpt, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["settings"][key] = value
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(run_cli("export", broken, "-o", tmp_path / "x.gguf"), said)
    assert not (tmp_path / "x.gguf").exists()
