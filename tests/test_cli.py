"""The command line: documented errors and exit codes, and a small quantize + eval run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner
from write_limits import files_limited_to

from slim2gguf.cli import app

runner = CliRunner()


def invoke(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_wrong_bits(tiny_model, tmp_path):
    code, out = invoke("convert", tiny_model, "-o", tmp_path / "x.gguf", "--bits", 5)
    assert code == 2 and "average bits must be one of (2, 3, 4)" in out
    assert list(tmp_path.iterdir()) == []


def test_unknown_method(tiny_model, tmp_path):
    code, out = invoke("quantize", tiny_model, "-o", tmp_path / "ck", "--method", "awq")
    assert code == 2 and "method must be one of slim, gptq, rtn" in out


def test_eval_refuses_unusable_windows_before_loading(tiny_model, tiny_text, monkeypatch):
    """--ctx 0 divided by zero (a traceback) after the model loaded; --chunks 0 read as too short a text."""
    from slim2gguf import models

    monkeypatch.setattr(models, "load_model", lambda *_: pytest.fail("weights loaded"))
    for options, message in (
        (("--ctx", 0), "--ctx must be at least 8 tokens (llama-perplexity's smallest window), got 0"),
        (("--chunks", 0), "--chunks must be ≥ 1, got 0"),
        (("--method", "half"), "--method must be one of llama, full, got 'half'"),
        (("--backend", "cuda"), "--backend must be one of torch, triton, got 'cuda'"),
        # positions past the model's context were scored as if it had been made for them
        (("--ctx", 513), "--ctx 513 is longer than the model's context (512 tokens): give --ctx 512 or less"),
    ):
        code, out = invoke("eval", tiny_model, "--text", tiny_text, *options)
        assert code == 2 and out.strip() == f"error: {message}", out


def test_typer_refusals_are_one_line(tmp_path):
    """A value that is no int, a missing option or argument, an unknown command: Typer drew a
    usage line, a hint and a boxed panel; now one line like slim2gguf's own errors, exit code 2."""
    for args, said in (
        (("quantize", "--bits", "abc", tmp_path, "-o", tmp_path / "ck"), "error: Invalid value for '--bits': "),
        (("quantize", tmp_path), "error: Missing option '-o' / '--out'. (see 'slim2gguf quantize --help')"),
        (("inspect",), "error: Missing argument 'path'. (see 'slim2gguf inspect --help')"),
        (("bogus",), "error: No such command 'bogus'. (see 'slim2gguf --help')"),
        (("llama-cpp", "build", "--jobs", 0), "error: Invalid value for '--jobs' / '-j': "),
    ):
        result = runner.invoke(app, [str(a) for a in args], prog_name="slim2gguf")
        out = result.output.strip()
        assert result.exit_code == 2 and out.startswith(said) and "\n" not in out, out
    result = runner.invoke(app, [], prog_name="slim2gguf")  # no arguments: the help
    assert result.exit_code == 2 and "Usage: slim2gguf" in result.output and "error" not in result.output


def test_run_refuses_a_negative_token_count(tmp_path):
    """llama.cpp reads -n -1 as "until stopped"; run prints the text at the end, so it would never print."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    code, out = invoke("run", model, "-p", "hi", "-n", -1)
    assert code == 2 and "Invalid value for '-n'" in out
    for option, value in (("-n", 3_000_000_000), ("--threads", 0)):  # llama.cpp's stoi failed, with its usage text
        code, out = invoke("run", model, "-p", "hi", option, value)
        assert code == 2 and f"Invalid value for '{option}'" in out, out
    code, out = invoke("run", model, "-p", "")  # llama-completion's whole log, ending in "input is empty"
    assert code == 2 and out.strip() == "error: --prompt is empty: give the text the model continues"


def test_llama_cpp_commands_refuse_bad_input_in_one_line(tmp_path, monkeypatch):
    """export-patches of a folder that is not a build tree (or no folder) raised LlamaCppError or
    FileNotFoundError tracebacks; --jobs 0 reached the build."""
    for folder, said in ((tmp_path, f"error: {tmp_path} is not a git tree made by slim2gguf's build"), (tmp_path / "none", f"error: {tmp_path / 'none'} is not a folder")):
        code, out = invoke("llama-cpp", "export-patches", folder)
        assert code == 1 and out.startswith(said) and "Traceback" not in out, out
    code, out = invoke("llama-cpp", "build", "--jobs", 0)
    assert code == 2 and "Invalid value for '--jobs'" in out
    source = tmp_path / "[/x]" / "none"  # rich read "[/x]" as a closing tag: a MarkupError in place of the error
    monkeypatch.setenv("LLAMA_CPP_DIR", str(source))
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path / "cache"))
    code, out = invoke("llama-cpp", "build")
    assert code == 1 and "".join(out.split()) == "".join(f"error: LLAMA_CPP_DIR={source} is not a llama.cpp source tree (no ggml/include/ggml.h)".split()), out


def test_the_build_key_follows_the_cpu_and_the_compilers_environment(monkeypatch):
    """The native build's folder was named by '-DGGML_NATIVE=ON' alone: a cache shared with a
    machine of other CPU features ran its build (SIGILL), and CC or CFLAGS set later were never
    used, as the first build was reused."""
    from slim2gguf import llamacpp

    for name in llamacpp.BUILD_ENV:
        monkeypatch.delenv(name, raising=False)
    keys = {cpu: llamacpp.build_key(cpu) for cpu in llamacpp.CPU_VARIANTS} | {"stock": llamacpp.build_key(patched=False)}
    defines = llamacpp.native_defines()
    with monkeypatch.context() as other_cpu:
        other_cpu.setattr(llamacpp, "native_defines", lambda: defines + "#define __AVX512VBMI__ 1\n")
        moved = {cpu: llamacpp.build_key(cpu) != keys[cpu] for cpu in llamacpp.CPU_VARIANTS} | {"stock": llamacpp.build_key(patched=False) != keys["stock"]}
        assert moved == {"native": True, "avx2": False, "sanitize": False, "generic": False, "stock": True}
    with monkeypatch.context() as flags:
        flags.setenv("CFLAGS", "-O0")
        assert all(llamacpp.build_key(cpu) != keys[cpu] for cpu in llamacpp.CPU_VARIANTS)
    monkeypatch.setenv("CC", "env cc")  # a launcher before the compiler, as "ccache gcc", which cmake allows
    llamacpp.native_defines.cache_clear()
    try:
        assert llamacpp.native_defines() == defines
        llamacpp._check_toolchain()
        monkeypatch.setenv("CC", "/nonexistent/cc")  # a traceback from the -march=native probe
        llamacpp.native_defines.cache_clear()
        assert llamacpp.native_defines() == "" and llamacpp.build_key("native")
        with pytest.raises(llamacpp.LlamaCppError, match="CC=/nonexistent/cc names no program found: install it, or set CC to a compiler you have"):
            llamacpp._check_toolchain()
    finally:
        llamacpp.native_defines.cache_clear()


def test_clean_keeps_builds_of_this_series_for_other_machines(tmp_path, monkeypatch):
    """With the CPU in the build key, clean took another machine's build in a shared cache (or one
    made with CC set) for stale; builds of other patches or commits, or with no stamp, go."""
    from slim2gguf import llamacpp

    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path))
    root = tmp_path / "llama.cpp"
    stamps = {"other-cpu": llamacpp.series_digest(True), "other-cpu-stock": llamacpp.series_digest(False), "old-patches": "0" * 16, "no-series": None}
    for name, series in stamps.items():
        (root / f"build-{name}").mkdir(parents=True)
        (root / f"build-{name}" / "stamp.json").write_text(json.dumps({"targets": [], **({"series": series} if series else {})}))
    (root / "build-no-stamp").mkdir()
    (root / llamacpp.build_dir("native").name).mkdir()
    assert [p.name for p in llamacpp.stale_build_dirs()] == ["build-no-series", "build-no-stamp", "build-old-patches"]


def test_export_patches_replaces_only_the_series_it_writes(tmp_path, monkeypatch):
    """export-patches into another folder deleted the repository's patches/ (it listed those, not
    the destination's); the destination's old series is replaced only once every diff is made."""
    from slim2gguf import llamacpp

    tree = tmp_path / "tree"
    (tree / "ggml").mkdir(parents=True)
    (tree / "ggml" / "a.c").write_text("int a;\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tree)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "pristine"], check=True)
    repo_patches, dest = tmp_path / "patches", tmp_path / "dest"
    repo_patches.mkdir()
    dest.mkdir()
    (dest / "0009-gone.patch").write_text("old\n")
    with pytest.raises(llamacpp.LlamaCppError, match="has no changes since its first commit: nothing to export"):
        llamacpp.export_patches(tree, dest)  # a pristine tree (or any one-commit repository) deleted the series
    assert (dest / "0009-gone.patch").read_text() == "old\n"
    (tree / "ggml" / "a.c").write_text("int a = 1;\n")
    (tree / "src").mkdir()
    (tree / "src" / "b.cpp").write_text("int b;\n")
    (repo_patches / "0001-ggml-slim-types.patch").write_text("kept\n")
    (dest / "0001-ggml-slim-types.patch").write_text("old\n")
    monkeypatch.setattr(llamacpp, "PATCH_DIR", repo_patches)
    (tree / "notes.txt").write_text("mine\n")  # no patch covers it: refused
    with pytest.raises(llamacpp.LlamaCppError, match="notes.txt matches no entry of PATCH_SERIES"):
        llamacpp.export_patches(tree, dest)
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    assert status.splitlines() == [" M ggml/a.c", "?? notes.txt", "?? src/"], status  # the tree's index untouched (git add -A staged all)
    (tree / "notes.txt").unlink()
    written = llamacpp.export_patches(tree, dest)
    assert [p.name for p in written] == ["0001-ggml-slim-types.patch", "0003-llama-slim-types.patch"]
    assert sorted(p.name for p in dest.iterdir()) == [p.name for p in written]
    assert "+int a = 1;" in (dest / "0001-ggml-slim-types.patch").read_text()
    assert "+int b;" in (dest / "0003-llama-slim-types.patch").read_text()
    assert (repo_patches / "0001-ggml-slim-types.patch").read_text() == "kept\n"


def test_a_llama_cpp_source_that_cannot_be_written_fails_in_one_line(tmp_path, monkeypatch):
    """A full disk while llama.cpp's source was unpacked (build, or convert's export) was an OSError traceback."""
    from slim2gguf import llamacpp

    sdist, source = llamacpp.sdist_path(), llamacpp.ensure_source()  # from the usual cache
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / sdist.name).symlink_to(sdist)
    with files_limited_to(1 << 20):
        code, out = invoke("llama-cpp", "build")
    said = "".join(out.split())  # rich wraps long paths anywhere
    assert code == 1 and said == "".join(f"error: cannot write llama.cpp's source in {tmp_path / 'llama.cpp'}: File too large".split()), out
    assert [p.name for p in (tmp_path / "llama.cpp").iterdir() if p.name.startswith(("src-", ".src-"))] == []
    monkeypatch.setenv("LLAMA_CPP_DIR", str(source))  # the source is there: copying it fails
    with files_limited_to(1 << 20):
        code, out = invoke("llama-cpp", "build")
    build = llamacpp.build_dir("native", True)
    said = "".join(out.split())
    assert code == 1 and said == "".join(f"error: cannot copy llama.cpp's source into {build}: File too large".split()), out
    assert [p.name for p in build.iterdir()] == [".lock"]


def test_paths_with_brackets_print_as_they_are(tmp_path):
    """Rich read "[/x]" in a path as a closing style tag: the error about it was a MarkupError
    traceback, and "[b]" vanished from titles; every message now prints brackets as they are."""
    from export_helpers import write_small_gguf

    odd = tmp_path / "[/x] [b]"
    code, out = invoke("quantize", odd / "nothing", "-o", tmp_path / "ck")
    assert code == 2 and f"no model directory at {odd / 'nothing'} (give" in "".join(out.splitlines()), out
    odd.mkdir(parents=True)
    code, out = invoke("inspect", write_small_gguf(odd / "m.gguf"))
    assert code == 0 and "[/x][b]/m.gguf" in "".join(out.split()), out  # the title wraps


def test_slim2gguf_warnings_print_in_one_line():
    """The command's own warnings (a work folder it cannot lock) read like its errors, not as
    Python's "file:line: Category: message" and source line; other warnings keep that form."""
    code = (
        "import warnings, slim2gguf.cli\n"
        "from slim2gguf.checkpoint import CheckpointWarning\n"
        "warnings.warn('cannot lock [/x]', CheckpointWarning)\n"
        "warnings.warn('theirs', DeprecationWarning)\n"
    )
    shown = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, check=True).stderr
    assert shown.splitlines()[0] == "warning: cannot lock [/x]" and "DeprecationWarning: theirs" in shown.splitlines()[1], shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "rtn", "--sba"], "--sba/--no-sba applies to --method slim only: drop it with --method rtn"),
        (["--method", "gptq", "--fit", "sqc", "--no-sqc"], "--fit, --sqc/--no-sqc apply to --method slim only: drop them with --method gptq"),
        (["--method", "gptq", "--sqc-lambda", "2", "--sba-tokens", "64"], "--sqc-lambda, --sba-tokens apply to --method slim only"),
        (["--bpw", "5", "--group-size", "32"], "--bpw chooses every tensor's width and group size: drop --group-size"),
        (["--allocation", "{alloc}", "--group-size", "64"], "records each tensor's group size (32): drop --group-size"),
    ],
)
def test_options_a_run_would_ignore_are_refused(tiny_model, tmp_path, args, message):
    """Each was accepted and ignored: the file was the one made without it."""
    alloc = tmp_path / "manifest.json"
    alloc.write_text(json.dumps({"tensors": {"model.layers.0.mlp.down_proj": {"widths": [3, 3], "group_size": 32}}}))
    code, out = invoke("quantize", tiny_model, "-o", tmp_path / "ck", *[a.format(alloc=alloc) for a in args])
    assert code == 2 and message in " ".join(out.split()), out
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("seed", ["-1", "4294967296", "99999999999999999999"])
def test_seeds_outside_32_bits_are_refused(tiny_model, tmp_path, seed):
    """Seeds past 32 bits gave the output of their low 32 bits (or torch's 'Overflow when unpacking long long')."""
    code, out = invoke("quantize", tiny_model, "-o", tmp_path / "ck", "--seed", seed)
    assert code == 2 and "Invalid value for '--seed'" in out and len(out.strip().splitlines()) == 1, out


def test_missing_model(tmp_path):
    code, out = invoke("quantize", tmp_path / "nothing", "-o", tmp_path / "ck")
    assert code == 2 and "no model directory" in out


def test_unwritable_output(tiny_model, tmp_path):
    code, out = invoke("convert", tiny_model, "-o", tmp_path / "missing" / "x.gguf")
    assert code == 2 and "does not exist" in out
    code, out = invoke("convert", tiny_model, "-o", "/proc/slim2gguf-test.gguf")  # not writable, even by root
    assert code == 2 and "cannot write /proc/slim2gguf-test.gguf" in out


def test_an_unwritable_place_without_a_system_reason_names_the_error(tiny_model, tmp_path, monkeypatch):
    """An OSError with no strerror (a file system's own refusal) is named by its message, not 'None'."""

    def refuse(self, *args, **kwargs):
        raise OSError("the file system refused it")

    monkeypatch.setattr(Path, "touch", refuse)
    code, out = invoke("convert", tiny_model, "-o", tmp_path / "x.gguf")
    assert code == 2 and f"cannot write {tmp_path / 'x.gguf'}: the file system refused it" in " ".join(out.split()), out
    monkeypatch.setattr(Path, "mkdir", refuse)
    code, out = invoke("quantize", tiny_model, "-o", tmp_path / "new" / "ck")
    assert code == 2 and f"cannot write {tmp_path / 'new' / 'ck'}: the file system refused it" in " ".join(out.split()), out


def test_output_is_a_directory(tiny_model, tmp_path):
    code, out = invoke("convert", tiny_model, "-o", tmp_path)
    assert code == 2 and "is a directory" in out


def test_missing_files_for_inspect_run_validate(tmp_path):
    code, out = invoke("inspect", tmp_path / "none.gguf")
    assert code == 2 and "none.gguf" in out
    code, out = invoke("run", tmp_path / "none.gguf", "-p", "hi")
    assert code == 2 and "no GGUF file" in out
    code, out = invoke("validate", tmp_path / "none.gguf", "--model", "m", "--text", tmp_path / "t.txt")
    assert code == 2 and "no GGUF file" in out


def test_corrupt_gguf_for_inspect(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    code, out = invoke("inspect", bad)
    assert code == 2 and "error" in out


def test_quantize_then_eval(tiny_model, tiny_text, tmp_path):
    ck = tmp_path / "runs" / "ck"  # the folders above a checkpoint are made
    code, out = invoke("quantize", tiny_model, "-o", ck, "--bits", 3, "--group-size", 32, "--method", "gptq",
                       "--calib", tiny_text, "--nsamples", 4, "--seqlen", 64, "--no-refit")
    assert code == 0, out
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["settings"]["method"] == "gptq" and manifest["blocks_done"] == 2
    assert manifest["settings"]["refit"] is False
    code, out = invoke("eval", tiny_model, "--checkpoint", ck, "--text", tiny_text, "--ctx", 64, "--chunks", 2)
    assert code == 0, out
    assert "perplexity" in out and "62 tokens" in out


def test_eval_triton_on_a_cpu_without_triton_interpret(tiny_model, tiny_text, tmp_path):
    """eval chooses Triton's interpreter before the model loads (loading imports Triton; its
    helpers built for a GPU failed inside the kernels): a child with TRITON_INTERPRET unset."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels run on it, not in the interpreter")
    ck = tmp_path / "ck"
    code, out = invoke("quantize", tiny_model, "-o", ck, "--bits", 3, "--group-size", 32, "--method", "rtn")
    assert code == 0, out
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["eval", tiny_model, "--checkpoint", ck, "--text", tiny_text, "--ctx", 64, "--chunks", 1, "--backend", "triton"]
    r = subprocess.run([sys.executable, "-m", "slim2gguf", *map(str, args)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "31 tokens" in r.stdout, r.stderr[-2000:]


def test_calibration_from_jsonl_and_parquet(tiny_model, tmp_path):
    from slim2gguf.calib import CalibrationError, read_text

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(3)))
    assert read_text(str(jsonl)) == "line 0\n\nline 1\n\nline 2"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b", "c d"]}), tmp_path / "c.parquet")
    assert read_text(str(tmp_path / "c.parquet")) == "a b\n\nc d"
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "no_text.parquet")
    with pytest.raises(CalibrationError, match="no 'text' column"):
        read_text(str(tmp_path / "no_text.parquet"))
    with pytest.raises(CalibrationError, match="neither"):
        read_text(str(tmp_path / "absent.txt"))


def test_version_names_patches_and_commit():
    from slim2gguf import __version__, llamacpp

    code, out = invoke("--version")
    assert code == 0 and out.strip() == (
        f"slim2gguf {__version__}, patch series {llamacpp.patch_series_hash()}, llama.cpp {llamacpp.PINNED_COMMIT}"
    )


def test_a_file_that_is_not_gguf_is_named_before_any_build(tmp_path, monkeypatch):
    """A safetensors file given to run or validate reads as what it is, in one line, not as a
    build that lacks the patches nor as llama.cpp's log."""
    from slim2gguf import llamacpp

    monkeypatch.setenv(llamacpp.BIN_ENV, "")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    first = weights.read_bytes()[:4]
    expected = f"error: {weights} is not a GGUF file: it begins with {first!r}, not b'GGUF'"
    for args in (("run", weights, "-p", "hi"), ("validate", weights, "--text", weights)):
        code, out = invoke(*args, "--llama-cpp-bin", tmp_path / "nowhere")
        assert code == 2 and out.strip() == expected, out


def test_own_build_is_checked_before_running(tmp_path, monkeypatch):
    from slim2gguf import llamacpp

    monkeypatch.setenv(llamacpp.BIN_ENV, "")  # restored after the test: the command sets it
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    code, out = invoke("run", model, "-p", "hi", "--llama-cpp-bin", tmp_path / "nowhere")
    assert code == 2 and "does not exist" in out
    code, out = invoke("run", model, "-p", "hi", "--llama-cpp-bin", tmp_path)
    assert code == 2 and "has no llama-slim-dump" in out
    fake = tmp_path / "llama-slim-dump"  # an unpatched tool of that name: exits with ggml's complaint
    fake.write_text("#!/bin/sh\necho 'gguf_init_from_file_impl: tensor has invalid ggml type 1004' >&2\nexit 1\n")
    fake.chmod(0o755)
    llamacpp.checked_user_build.cache_clear()
    code, out = invoke("run", model, "-p", "hi", "--llama-cpp-bin", tmp_path)
    assert code == 2 and "cannot read a SliM tensor (gguf_init_from_file_impl: tensor has invalid ggml type 1004)" in out
    fake.chmod(0o644)  # a tool that cannot run, and a temporary folder the probe cannot be written in: tracebacks
    llamacpp.checked_user_build.cache_clear()
    code, out = invoke("run", model, "-p", "hi", "--llama-cpp-bin", tmp_path)
    assert code == 2 and out.strip() == f"error: {fake} cannot run: Permission denied", out
    with monkeypatch.context() as patched:
        patched.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
        llamacpp.checked_user_build.cache_clear()
        code, out = invoke("run", model, "-p", "hi", "--llama-cpp-bin", tmp_path)
    assert code == 2 and out.strip() == f"error: no probe file can be written in {tmp_path / 'gone'} (set TMPDIR): No such file or directory", out
    fake.write_text("#!/bin/sh\nexit 0\n")  # a dump tool that reads the probe, and a llama-completion that cannot run
    fake.chmod(0o755)
    (tmp_path / "llama-completion").write_text("not a program")
    llamacpp.checked_user_build.cache_clear()
    code, out = invoke("run", model, "-p", "hi", "--llama-cpp-bin", tmp_path)
    assert code == 2 and out.strip() == f"error: {tmp_path / 'llama-completion'} cannot run: Permission denied", out


def test_a_cache_setting_that_is_no_folder_is_one_line(tmp_path, monkeypatch):
    """SLIM2GGUF_CACHE naming a file was a FileExistsError traceback from the first command that
    used the cache (convert, a named model, llama-cpp build)."""
    cache = tmp_path / "cache"
    cache.write_text("a file")
    monkeypatch.setenv("SLIM2GGUF_CACHE", str(cache))
    for args in (("convert", "smollm2-135m", "-o", tmp_path / "x.gguf"), ("llama-cpp", "build")):
        code, out = invoke(*args)
        assert code == 2 and out.strip() == f"error: SLIM2GGUF_CACHE={cache} is not a folder: point it at a folder for slim2gguf's downloads and builds", out
    assert cache.read_text() == "a file" and not (tmp_path / "x.gguf").exists()
    for args in (("convert", "--help"), ("llama-cpp", "build", "--help")):  # a command's help needs no cache
        code, out = invoke(*args)
        assert code == 0 and "Usage:" in out and "SLIM2GGUF_CACHE=" not in out, out
