"""Reading a SliM GGUF back into the HF model, and the validation/run wrappers, without llama.cpp.

The llama.cpp tools are replaced by recorded output (a real llama-perplexity log)
or a stub script; the end-to-end run with the patched tools lives in tests/e2e.
One tiny LLaMA (its q/k rows are permuted in the file) is exported once per module,
and the converter's mapping child runs once per model (cached), to keep this fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from export_helpers import random_qtensor, tiny_model_dir, write_random_checkpoint, write_small_gguf
from write_limits import files_limited_to

from slim2gguf import format as fmt
from slim2gguf import gguf_weights, run, validate
from slim2gguf.export import export_gguf
from slim2gguf.gguf_weights import GGUFWeightsError, packed_from_gguf, slim_weights_from_gguf
from slim2gguf.inspect_gguf import GGUFFileError, open_gguf
from slim2gguf.models import ModelError, load_model, set_linear_weights
from slim2gguf.named_models import demo_model_dir
from slim2gguf.perplexity import PerplexityResult
from slim2gguf.qtensor import QuantizedTensor
from slim2gguf.run import LlamaToolError, run_completion
from slim2gguf.validate import ValidationError, ValidationResult, judge, parse_llama_perplexity

SKIPPED = "model.layers.1.mlp.down_proj"  # left out of the checkpoint: F32 in the file
# The end of a real `llama-perplexity -c 128 --chunks 4` run (stderr; timestamps and
# level as llama.cpp's logger writes them, the ETA line cut by stdout's progress).
PERPLEXITY_LOG = """\
0.00.633.610 W llama_perplexity: model was trained on only 512 context tokens (2048 specified)
0.00.633.843 I perplexity: tokenizing the input ..
0.00.642.420 I perplexity: tokenization took 8.567 ms
0.00.642.484 I perplexity: calculating perplexity over 4 chunks, n_ctx=128, batch_size=2048, n_seq=16
0.00.932.652 I perplexity: 0.29 seconds per pass - ETA 0.01.043.163 I Final estimate: PPL = 48956.1869 +/- 713.74404
"""


@pytest.fixture(scope="module", autouse=True)
def one_mapping_per_model():
    """The converter child takes seconds to start: ask it once per model directory."""
    real = gguf_weights.converter_mapping
    cache: dict[str, dict] = {}

    def cached(model_dir, linears):
        key = str(Path(model_dir).resolve())
        if key not in cache:
            cache[key] = real(model_dir, linears)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_weights, "converter_mapping", cached)
        yield


@dataclass
class Exported:
    model: Path
    path: Path
    reader: gguf.GGUFReader  # parsing the 49152-token vocabulary takes seconds: done once
    reference: dict[str, QuantizedTensor]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    """A tiny 3-bit LLaMA, its GGUF export and the checkpoint's tensors."""
    root = tmp_path_factory.mktemp("validate")
    model = tiny_model_dir(root / "model", "LlamaForCausalLM", demo_model_dir(), tie_word_embeddings=False)
    reference = write_random_checkpoint(root / "ckpt", model, 3, 64, skip=(SKIPPED,))
    with pytest.warns(UserWarning, match="not in the checkpoint"):
        path = export_gguf(root / "ckpt", root / "model.gguf", progress=False).path
    return Exported(model, path, open_gguf(path), reference)


@pytest.fixture
def small_slim_gguf(tmp_path) -> Path:
    """A quick-to-parse file with one SliM tensor, ``slim2gguf.bits`` = 2 and a context of 512."""
    qt = random_qtensor(64, 128, 2, 64, torch.Generator().manual_seed(0))
    return write_gguf(tmp_path / "small2.gguf", {"blk.0.ffn_up.weight": (qt.pack(), qt.stype)}, bits=2)


def write_gguf(path: Path, tensors: dict[str, np.ndarray | tuple[np.ndarray, fmt.SlimType]], bits: int | None) -> Path:
    """A GGUF file with these tensors (packed SliM ones as (rows, type)), a context of 512 and optionally slim2gguf.bits."""
    fmt.register_gguf_types()
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_context_length(512)
    if bits is not None:
        writer.add_uint32(validate.BITS_KEY, bits)
    for name, data in tensors.items():
        if isinstance(data, tuple):
            writer.add_tensor(name, data[0], raw_dtype=gguf.GGMLQuantizationType(data[1].type_id))
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- reading the file's weights ----------------------------------------------------------


def test_weights_are_the_checkpoints_bit_for_bit(exported):
    weights = slim_weights_from_gguf(exported.reader, exported.model)
    assert set(weights) == set(exported.reference) and SKIPPED not in weights
    for name, qt in exported.reference.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name].view(torch.int32), qt.dequantize().view(torch.int32)), name


def test_packed_rows_are_the_checkpoints_in_hf_order(exported):
    packed = packed_from_gguf(exported.reader, exported.model)
    assert set(packed) == set(exported.reference)
    for name, qt in exported.reference.items():
        rows, stype = packed[name]
        assert stype == fmt.slim_type(3, 64)
        assert np.array_equal(rows, qt.pack()), name


def test_q_rows_are_permuted_in_the_file(exported):
    """Guards the tests above: q_proj's rows only match once un-permuted."""
    stored = next(t for t in exported.reader.tensors if t.name == "blk.0.attn_q.weight")
    packed = exported.reference["model.layers.0.self_attn.q_proj"].pack()
    assert not np.array_equal(np.asarray(stored.data).reshape(packed.shape), packed)


@torch.no_grad()
@pytest.mark.parametrize("n_tokens", [1, 16], ids=["gemv", "tiled"])
def test_triton_backend_matches_torch_backend(exported, n_tokens):
    from slim2gguf.triton_linear import SlimLinear, swap_linears

    ids = torch.randint(0, 49152, (1, n_tokens), generator=torch.Generator().manual_seed(n_tokens))
    dequantized = load_model(exported.model)
    set_linear_weights(dequantized, slim_weights_from_gguf(exported.reader, exported.model))
    kernels = load_model(exported.model)
    swap_linears(kernels, packed_from_gguf(exported.reader, exported.model))
    assert sum(isinstance(m, SlimLinear) for m in kernels.modules()) == len(exported.reference)
    expected = dequantized(ids).logits
    got = kernels(ids).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_file_without_slim_tensors(tmp_path, exported):
    path = write_gguf(tmp_path / "f32.gguf", {"output_norm.weight": np.ones(128, np.float32)}, bits=None)
    with pytest.raises(GGUFWeightsError, match="no SliM or quantized decoder tensors"):
        slim_weights_from_gguf(path, exported.model)


def test_file_from_another_model(tmp_path, exported, small_slim_gguf):
    with pytest.raises(GGUFWeightsError, match=r"blk\.0\.ffn_up\.weight is 64x128 .* 256x128"):
        slim_weights_from_gguf(small_slim_gguf, exported.model)  # the model's ffn_up is 256 x 128
    up = packed_from_gguf(exported.reader, exported.model)["model.layers.0.mlp.up_proj"]
    deeper = write_gguf(tmp_path / "deeper.gguf", {"blk.5.ffn_up.weight": up}, bits=3)
    with pytest.raises(GGUFWeightsError, match=r"blk\.5\.ffn_up\.weight, which no decoder linear"):
        slim_weights_from_gguf(deeper, exported.model)


def test_missing_inputs(tmp_path, exported):
    with pytest.raises(GGUFFileError, match="no such file"):
        slim_weights_from_gguf(tmp_path / "nope.gguf", exported.model)
    with pytest.raises(ModelError, match="no model directory"):
        packed_from_gguf(exported.path, tmp_path / "no-model")


# --- validation --------------------------------------------------------------------------


def test_wikitext2_text_file_that_cannot_be_written(tmp_path, monkeypatch):
    """validate hands llama-perplexity WikiText-2's test text as a temporary file: a full or
    missing temporary folder is one line naming TMPDIR (it was an OSError traceback)."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with validate._text_file("wikitext2", "x" * 5000) as written:
        assert written.read_text() == "x" * 5000
    assert not written.parent.exists()  # removed after the run
    with files_limited_to(1000), pytest.raises(ValidationError, match=r"^cannot write WikiText-2's .* File too large; set TMPDIR"):
        with validate._text_file("wikitext2", "x" * 5000):
            pass
    assert not list(temp.iterdir())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    with pytest.raises(ValidationError, match=r"^cannot write WikiText-2's .*set TMPDIR to a writable folder$"):
        with validate._text_file("wikitext2", "text"):
            pass
    with validate._text_file(tmp_path / "mine.txt", "text") as users:  # the user's file, as it is
        assert users == tmp_path / "mine.txt"


def test_parse_llama_perplexity():
    assert parse_llama_perplexity(PERPLEXITY_LOG) == 48956.1869
    failed = PERPLEXITY_LOG.replace("Final estimate", "Unexpected negative standard deviation").splitlines()[-1]
    with pytest.raises(LlamaToolError, match="no final estimate(.|\n)*Unexpected negative"):
        parse_llama_perplexity(failed)


@pytest.mark.parametrize(
    "ppl_torch, ppl_llama, threshold, passed",
    [
        (10.0, 10.0, 0.01, True),
        (10.05, 10.0, 0.01, True),
        (9.95, 10.0, 0.01, True),
        (10.2, 10.0, 0.01, False),
        (9.8, 10.0, 0.01, False),
        (10.15, 10.0, 0.02, True),
        (float("nan"), 10.0, 0.01, False),
        (10.0, float("inf"), 0.01, False),
    ],
)
def test_judge(ppl_torch, ppl_llama, threshold, passed):
    result = judge(ppl_torch, ppl_llama, threshold, tokens=100)
    assert result.passed is passed
    if np.isfinite(ppl_torch) and np.isfinite(ppl_llama):
        assert result.rel_gap == pytest.approx(abs(ppl_torch - ppl_llama) / ppl_llama)


@pytest.mark.parametrize("bits, threshold", [(2, 0.02), (3, 0.01), (4, 0.01)])
def test_default_threshold(tmp_path, bits, threshold):
    path = write_gguf(tmp_path / "x.gguf", {"output_norm.weight": np.ones(32, np.float32)}, bits=bits)
    assert validate.default_threshold(open_gguf(path)) == threshold


def test_default_threshold_needs_the_bits_key(tmp_path):
    with pytest.raises(ValidationError, match="slim2gguf.bits"):
        validate.default_threshold(open_gguf(write_small_gguf(tmp_path / "small.gguf")))


def fake_tool(calls: list, stdout: str = "", stderr: str = ""):
    """A run_tool stand-in that records its calls and answers with the given output."""

    def tool(name, args, gguf_path=None):
        calls.append((name, [str(a) for a in args]))
        return subprocess.CompletedProcess([name], 0, stdout=stdout, stderr=stderr)

    return tool


def test_a_run_whose_last_lines_were_lost_is_repeated(monkeypatch):
    """llama.cpp's leaked logger can drop a tool's last lines with exit code 0 (validate.LOG_LOSS_RETRIES)."""
    cut = PERPLEXITY_LOG[: PERPLEXITY_LOG.index("Final estimate")]
    logs = iter([cut, PERPLEXITY_LOG])
    calls: list = []

    def tool(name, args, gguf_path=None):
        calls.append(name)
        return subprocess.CompletedProcess([name], 0, stdout="", stderr=next(logs))

    monkeypatch.setattr(validate, "run_tool", tool)
    assert validate.llama_perplexity("m.gguf", "t.txt", 128, 4) == 48956.1869 and len(calls) == 2
    monkeypatch.setattr(validate, "run_tool", fake_tool(calls, stderr=cut))
    with pytest.raises(LlamaToolError, match="no final estimate"):
        validate.llama_perplexity("m.gguf", "t.txt", 128, 4)
    assert len(calls) == 2 + validate.LOG_LOSS_RETRIES


@pytest.mark.parametrize("llama_ppl, passed", [(1000.0, True), (1030.0, False)])
def test_validate_compares_both_sides(monkeypatch, tmp_path, small_slim_gguf, llama_ppl, passed):
    calls: list = []
    log = PERPLEXITY_LOG.replace("48956.1869", f"{llama_ppl:.4f}")
    monkeypatch.setattr(validate, "run_tool", fake_tool(calls, stderr=log))
    torch_side: list = []

    def fake_torch(*args):
        torch_side.append(args)
        return PerplexityResult(ppl=1005.0, nll=6.9, tokens_scored=254, chunks=2)

    monkeypatch.setattr(validate, "torch_perplexity", fake_torch)
    text = tmp_path / "eval.txt"
    text.write_bytes(b"some text\r\nwith CRLF\n")
    result = validate.validate(small_slim_gguf, "some-model", text, ctx=256, chunks=2, backend="triton", threads=3)
    assert calls == [
        ("llama-perplexity", ["-m", str(small_slim_gguf), "-f", str(text), "-c", "256", "--chunks", "2", "-t", "3"])
    ]
    reader, *rest = torch_side[0]
    assert isinstance(reader, gguf.GGUFReader)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto, resolved (and checked) before anything runs
    assert rest == ["some-model", "some text\r\nwith CRLF\n", 256, 2, "triton", device, True]
    # a 2-bit file: 2 % by default
    assert result == ValidationResult(1005.0, llama_ppl, abs(1005.0 - llama_ppl) / llama_ppl, 0.02, passed, 254)


def test_validate_torch_side_on_the_tiny_model(monkeypatch, exported, tiny_text):
    """The real PyTorch path (file weights swapped in, llama-style windows); llama.cpp recorded."""
    monkeypatch.setattr(validate, "run_tool", fake_tool([], stderr=PERPLEXITY_LOG))
    monkeypatch.setattr(validate, "open_gguf", lambda path: exported.reader)
    result = validate.validate(exported.path, exported.model, tiny_text, ctx=64, chunks=2)
    assert result.tokens == 2 * (64 - 32 - 1)
    assert np.isfinite(result.ppl_torch) and result.ppl_torch > 1
    assert result.ppl_llama == 48956.1869 and result.threshold == 0.01
    assert result.kld_float > 0 and np.isfinite(result.ppl_float)  # the float model was given


def test_triton_backend_of_a_file_alone_without_triton_interpret(exported, tiny_text):
    """On a CPU with TRITON_INTERPRET unset, validate picks Triton's interpreter before reading the
    file alone imports Triton (it raised ImportError, and before that failed inside the kernels).
    A child process, so Triton is imported there first; llama.cpp's side is the end-to-end layer's."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels run on it")
    script = (
        "from slim2gguf import validate\n"
        "validate.llama_perplexity = lambda *args: 10.0\n"
        f"r = validate.validate({str(exported.path)!r}, None, {str(tiny_text)!r}, ctx=64, chunks=1, backend='triton', threshold=1e9)\n"
        "print(r.tokens)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split()[-1] == "31", r.stderr[-3000:]


def test_validate_checks_inputs_before_running_anything(monkeypatch, tmp_path, small_slim_gguf, tiny_text):
    monkeypatch.setattr(validate, "run_tool", lambda *a: pytest.fail("no tool may run"))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        validate.validate(tmp_path / "nope.gguf", "model", tiny_text)
    with pytest.raises(FileNotFoundError, match="no evaluation text"):
        validate.validate(small_slim_gguf, "model", tmp_path / "nope.txt")
    with pytest.raises(ValidationError, match="not UTF-8"):
        validate.validate(small_slim_gguf, "model", small_slim_gguf)
    with pytest.raises(ValidationError, match=re.escape("--backend must be one of torch, triton, got 'cuda'")):
        validate.validate(small_slim_gguf, "model", tiny_text, backend="cuda")
    for options, message in (
        ({"ctx": 4}, "--ctx must be at least 8 tokens"),
        ({"ctx": 513}, "--ctx 513 is longer than the model's context (512 tokens): give --ctx 512 or less"),
        ({"chunks": 0}, "--chunks must be ≥ 1, got 0"),
        ({"threshold": -0.01}, "--threshold is the largest relative gap that passes: it must be > 0, got -0.01"),
        ({"threshold": float("nan")}, "--threshold is the largest relative gap that passes: it must be > 0, got nan"),
        ({"device": "foo"}, "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),  # was a torch traceback
        *([({"device": "cuda"}, "--device cuda asked for, but torch sees no CUDA GPU")] if not torch.cuda.is_available() else []),
    ):
        with pytest.raises(ValidationError, match=re.escape(message)):
            validate.validate(small_slim_gguf, "model", tiny_text, **options)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(small_slim_gguf.read_bytes()[:-100])
    with pytest.raises(GGUFFileError, match="truncated"):
        validate.validate(broken, "model", tiny_text)


def test_print_validation():
    from rich.console import Console

    console = Console(record=True, width=100)
    validate.print_validation(judge(10.1, 10.0, 0.01, 1000), console)
    text = console.export_text()
    assert "10.1000" in text and "1.000 %" in text and "1,000" in text and "PASS" in text
    assert "note: only 1,000 tokens scored; below 1,024 the gap is mostly noise" in " ".join(text.split())
    console = Console(record=True, width=100)
    validate.print_validation(judge(10.1, 10.0, 0.01, 5120), console)
    assert "note" not in console.export_text()


# --- llama-completion and tool failures --------------------------------------------------


@pytest.mark.parametrize("stdout, text", [(" a b c\n\n", " a b c"), (" a b [end of text]\n\n\n", " a b")])
def test_run_completion(monkeypatch, small_slim_gguf, stdout, text):
    calls: list = []
    monkeypatch.setattr(run, "run_tool", fake_tool(calls, stdout=stdout))
    got = run_completion(small_slim_gguf, "Hi\\n there", n_predict=5, threads=2, seed=7, extra_args=("--top-k", "1"))
    assert got == text
    name, args = calls[0]
    assert name == "llama-completion"
    assert args[:4] == ["-m", str(small_slim_gguf), "-p", "Hi\\n there"]
    for flags in (["-n", "5"], ["--seed", "7"], ["--temp", "0"], ["-t", "2"]):
        assert any(args[i : i + 2] == flags for i in range(len(args))), flags
    assert {"-no-cnv", "--no-display-prompt", "--no-escape"} <= set(args)
    assert args[-2:] == ["--top-k", "1"]


def test_run_completion_missing_file(monkeypatch, tmp_path):
    monkeypatch.setattr(run, "run_tool", lambda *a: pytest.fail("no tool may run"))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        run_completion(tmp_path / "nope.gguf", "Hi")


def test_tool_failure_shows_its_log(monkeypatch, tmp_path, small_slim_gguf):
    stub = tmp_path / "llama-perplexity"
    stub.write_text("#!/bin/sh\n" + "".join(f"echo line{i} >&2\n" for i in range(40)) + "exit 3\n")
    stub.chmod(0o755)
    monkeypatch.setattr(run, "binary", lambda name, stock_ok=None: tmp_path / name)
    with pytest.raises(LlamaToolError) as err:
        validate.llama_perplexity(small_slim_gguf, tmp_path / "t.txt", 128, 4)
    message = str(err.value)
    assert "llama-perplexity failed (exit code 3)" in message
    assert "line39" in message and "line15" in message and "line14" not in message


def test_a_silent_tool_failure_on_a_cut_file_names_the_file(monkeypatch, tmp_path, small_slim_gguf):
    """llama-completion exits 1 without a word on a GGUF cut short in its header: the error
    ended in "failed (exit code 1):" and nothing; now it says what is wrong with the file."""
    stub = tmp_path / "llama-completion"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.setattr(run, "binary", lambda name, stock_ok=None: tmp_path / name)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(small_slim_gguf.read_bytes()[:100])
    with pytest.raises(LlamaToolError, match=r"^llama-completion failed \(exit code 1\): .*cut\.gguf \(100 bytes\) is not a valid GGUF file or is truncated"):
        run_completion(cut, "Hi")
    with pytest.raises(LlamaToolError, match=r"^llama-completion failed \(exit code 1\):\nit printed nothing$"):
        run_completion(small_slim_gguf, "Hi")  # a readable file: the tool's (empty) log


def test_a_quick_failure_is_run_again_for_its_log(monkeypatch, tmp_path, small_slim_gguf):
    """A build without patches/0007 does not wait for its logging thread at exit, so a tool
    that fails at once often loses the lines that say why (1 run in 6 to 4 in 5 of
    llama-completion on a file it refuses): a quick failure runs again and the longest log
    is kept; a slow one runs once."""
    runs = tmp_path / "runs"
    stub = tmp_path / "llama-completion"  # its log reaches stderr on the third run only
    stub.write_text(f"#!/bin/sh\necho x >> {runs}\n[ $(wc -l < {runs}) -ge 3 ] && echo 'key not found in model' >&2\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.setattr(run, "binary", lambda name, stock_ok=None: tmp_path / name)
    with pytest.raises(LlamaToolError, match=r"^llama-completion failed \(exit code 1\):\nkey not found in model$"):
        run_completion(small_slim_gguf, "Hi")
    assert len(runs.read_text().split()) == run.LOG_TRIES
    runs.unlink()
    monkeypatch.setattr(run, "QUICK_FAILURE_S", 0.0)  # every failure counts as slow
    with pytest.raises(LlamaToolError, match=r"it printed nothing$"):
        run_completion(small_slim_gguf, "Hi")
    assert len(runs.read_text().split()) == 1


def test_a_build_that_drains_its_log_runs_a_quick_failure_once(monkeypatch, tmp_path, small_slim_gguf):
    """The patched builds slim2gguf makes print their whole log at exit (patches/0007): a
    quick failure ran 10 times there for nothing (up to 20 s)."""
    from slim2gguf import llamacpp

    ours = llamacpp.build_dir("native") / "build" / "bin" / "llama-completion"
    assert llamacpp.drains_its_log(ours) and llamacpp.drains_its_log(llamacpp.build_dir("sanitize") / "build" / "bin" / "x")
    assert not llamacpp.drains_its_log(llamacpp.build_dir(patched=False) / "build" / "bin" / "llama-completion")
    assert not llamacpp.drains_its_log(tmp_path / "llama-completion")  # a user's build
    runs = tmp_path / "runs"
    stub = tmp_path / "llama-completion"
    stub.write_text(f"#!/bin/sh\necho x >> {runs}\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.setattr(run, "binary", lambda name, stock_ok=None: tmp_path / name)
    monkeypatch.setattr(run, "drains_its_log", lambda tool: tool == stub)
    with pytest.raises(LlamaToolError, match=r"it printed nothing$"):
        run_completion(small_slim_gguf, "Hi")
    assert len(runs.read_text().split()) == 1
    runs.unlink()
    stub.write_text(f"#!/bin/sh\necho x >> {runs}\nkill -ABRT $$\n")  # a crash skips the wait at exit: run again
    with pytest.raises(LlamaToolError, match=r"exit code -6"):
        run_completion(small_slim_gguf, "Hi")
    assert len(runs.read_text().split()) == run.LOG_TRIES
