"""--format native in llama.cpp: stock types made by GPTQ on their stored values.

* every stock type, quantized by GPTQ, dequantizes through llama.cpp's own ``to_float``
  exactly as slim2gguf.storage dequantizes it (a file with one tensor per type);
* K-quant token embedding and output (rounded by slim2gguf.storage at export) likewise;
* the demo model converted to Q4_K (with llama-quantize's Q5_0 fallback on its
  576-wide rows): every quantized tensor bit exact in llama.cpp, and llama-perplexity
  agrees with PyTorch on the file's values within 1 %;
* an unpatched llama.cpp at the pinned commit (built by slim2gguf, cached) runs that
  file through ``validate`` and ``run --llama-cpp-bin``, and refuses a SliM file.
"""

from __future__ import annotations

import subprocess

import gguf
import numpy as np
import pytest
import torch
from test_demo import WIKI_VALID, eval_text, slim2gguf  # noqa: F401  (eval_text is a fixture)

from slim2gguf import llamacpp
from slim2gguf.inspect_gguf import open_gguf
from slim2gguf.methods import QuantSettings, quantize_linear
from slim2gguf.storage import NATIVE_TYPES, type_from_ggml

pytestmark = pytest.mark.e2e


def llama_dequant(path, name: str, shape: tuple[int, int], tmp_path) -> np.ndarray:
    out = tmp_path / "rows.f32"
    r = subprocess.run([str(llamacpp.binary(llamacpp.DUMP_TOOL)), str(path), "dequant", name, str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.fromfile(out, dtype=np.float32).reshape(shape)


def test_every_stock_type_dequantizes_in_llama_cpp_as_in_pytorch(tmp_path):
    llamacpp.build()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 512, generator=gen) * (0.2 + torch.rand(512, generator=gen))
    w = torch.randn(16, 512, generator=gen) * 0.02
    w[5] = 0
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    expected = {}
    for name in NATIVE_TYPES:
        nt, _ = quantize_linear(w, 2 / x.shape[0] * x.T @ x, None, QuantSettings("slim", native=name))
        expected[name] = nt.dequantize().numpy()
        rows = nt.pack()
        writer.add_tensor(name, rows, raw_shape=rows.shape, raw_dtype=gguf.GGMLQuantizationType(nt.stype.ggml_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for name, values in expected.items():
        got = llama_dequant(path, name, values.shape, tmp_path)
        assert got.view(np.uint32).tobytes() == values.view(np.uint32).tobytes(), name


def test_k_quant_embedding_and_output_dequantize_in_llama_cpp_as_in_pytorch(tmp_path):
    """The embedding and output that slim2gguf.storage rounds at export (K-quants gguf-py
    cannot write) read back in llama.cpp exactly as PyTorch reads them."""
    from export_helpers import tiny_model_dir, write_random_checkpoint

    from slim2gguf.export import export_gguf
    from slim2gguf.inspect_gguf import dequantize_tensor
    from slim2gguf.named_models import demo_model_dir

    llamacpp.build()
    model = tiny_model_dir(tmp_path / "wide", "LlamaForCausalLM", demo_model_dir(), hidden_size=256, intermediate_size=128,
                           head_dim=64, tie_word_embeddings=False)  # fmt: skip
    write_random_checkpoint(tmp_path / "ck", model, 3, 64)
    export_gguf(tmp_path / "ck", tmp_path / "wide.gguf", embed_type="q3_k", output_type="q6_k", progress=False)
    reader = open_gguf(tmp_path / "wide.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q3_K", "Q6_K")
    for name in ("token_embd.weight", "output.weight"):
        values = np.ascontiguousarray(dequantize_tensor(reader, name), dtype=np.float32)
        got = llama_dequant(tmp_path / "wide.gguf", name, values.shape, tmp_path)
        assert got.view(np.uint32).tobytes() == values.view(np.uint32).tobytes(), name


@pytest.fixture(scope="module")
def native_demo(tmp_path_factory):
    """The demo model converted by the CLI to --format native --type q4_k."""
    llamacpp.build()
    out = tmp_path_factory.mktemp("native") / "smollm2-q4_k.gguf"
    calib = str(WIKI_VALID) if WIKI_VALID.exists() else "self"
    r = slim2gguf("convert", "smollm2-135m", "-o", out, "--format", "native", "--type", "q4_k",
                  "--calib", calib, "--nsamples", 16, "--seqlen", 256)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_native_demo_file_is_bit_exact_and_agrees(native_demo, eval_text, tmp_path):  # noqa: F811
    from slim2gguf.validate import validate

    reader = open_gguf(native_demo)
    checked = {}
    for tensor in reader.tensors:
        stype = type_from_ggml(tensor.tensor_type)
        if stype is None or not tensor.name.startswith("blk."):
            continue
        rows = np.asarray(tensor.data).reshape(int(tensor.shape[1]), -1)
        values = stype.dequantize(rows).numpy()
        got = llama_dequant(native_demo, tensor.name, values.shape, tmp_path)
        assert got.view(np.uint32).tobytes() == values.view(np.uint32).tobytes(), tensor.name
        checked[tensor.name] = stype.name
    assert len(checked) == 30 * 7
    assert {n: t for n, t in checked.items() if t == "Q4_K"}.keys() == {f"blk.{i}.ffn_down.weight" for i in range(30)}
    result = validate(native_demo, "smollm2-135m", eval_text, ctx=512, chunks=20, threads=2)
    print(f"Q4_K native, patched build: PyTorch {result.ppl_torch:.4f}, llama.cpp {result.ppl_llama:.4f}, gap {result.rel_gap:.4%}")
    assert result.threshold == 0.01 and result.passed, result


def test_unpatched_llama_cpp_runs_native_files_and_refuses_slim_ones(native_demo, eval_text, tmp_path):  # noqa: F811
    stock = llamacpp.build(llamacpp.STOCK_TARGETS, patched=False)
    assert not (stock / llamacpp.DUMP_TOOL).exists()
    v = slim2gguf("validate", native_demo, "--model", "smollm2-135m", "--text", eval_text, "--chunks", 20, "--llama-cpp-bin", stock)
    print(v.stdout[-1500:])
    assert v.returncode == 0 and "PASS" in v.stdout, v.stdout[-2000:] + v.stderr[-2000:]
    r = slim2gguf("run", native_demo, "-p", "The capital of France is", "-n", 16, "--llama-cpp-bin", stock)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr[-2000:]
    slim_file = tmp_path / "slim.gguf"
    made = slim2gguf("convert", "smollm2-135m", "-o", slim_file, "--bits", 4, "--group-size", 64, "--method", "rtn")
    assert made.returncode == 0, made.stderr[-2000:]
    refused = slim2gguf("run", slim_file, "-p", "Hi", "-n", 4, "--llama-cpp-bin", stock)
    assert refused.returncode == 2 and "has no llama-slim-dump" in refused.stderr
    direct = subprocess.run([str(stock / "llama-completion"), "-m", str(slim_file), "-p", "Hi", "-n", "4", "-no-cnv"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert direct.returncode != 0 and "invalid ggml type" in direct.stderr, direct.stderr[-2000:]
