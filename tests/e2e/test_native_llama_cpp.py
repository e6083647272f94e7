"""--format native in llama.cpp: stock types made by GPTQ on their stored values.

* every stock type, quantized by GPTQ, dequantizes through llama.cpp's own ``to_float``
  exactly as slim2gguf.storage dequantizes it (a file with one tensor per type);
* the demo model converted to Q4_K (with llama-quantize's Q5_0 fallback on its
  576-wide rows): every quantized tensor bit exact in llama.cpp, and llama-perplexity
  agrees with PyTorch on the file's values within 1 %.
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
from slim2gguf.storage import NATIVE_TYPES, NativeType

pytestmark = pytest.mark.e2e


def llama_dequant(path, name: str, shape: tuple[int, int], tmp_path) -> np.ndarray:
    out = tmp_path / "rows.f32"
    r = subprocess.run([str(llamacpp.binary(llamacpp.DUMP_TOOL)), str(path), "dequant", name, str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.fromfile(out, dtype=np.float32).reshape(shape)


def stock_type_of(tensor) -> NativeType | None:
    return next((t for t in NATIVE_TYPES.values() if t.ggml_type == int(tensor.tensor_type)), None)


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


def test_native_demo_file_is_bit_exact_and_agrees(eval_text, tmp_path):  # noqa: F811
    from slim2gguf.validate import validate

    llamacpp.build()
    out = tmp_path / "smollm2-q4_k.gguf"
    calib = str(WIKI_VALID) if WIKI_VALID.exists() else "self"
    r = slim2gguf("convert", "smollm2-135m", "-o", out, "--format", "native", "--type", "q4_k",
                  "--calib", calib, "--nsamples", 16, "--seqlen", 256)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    reader = open_gguf(out)
    checked = {}
    for tensor in reader.tensors:
        stype = stock_type_of(tensor)
        if stype is None or not tensor.name.startswith("blk."):
            continue
        rows = np.asarray(tensor.data).reshape(int(tensor.shape[1]), -1)
        values = stype.dequantize(rows).numpy()
        got = llama_dequant(out, tensor.name, values.shape, tmp_path)
        assert got.view(np.uint32).tobytes() == values.view(np.uint32).tobytes(), tensor.name
        checked[tensor.name] = stype.name
    assert len(checked) == 30 * 7
    assert {n: t for n, t in checked.items() if t == "Q4_K"}.keys() == {f"blk.{i}.ffn_down.weight" for i in range(30)}
    result = validate(out, "smollm2-135m", eval_text, ctx=512, chunks=20, threads=2)
    print(f"Q4_K native: PyTorch {result.ppl_torch:.4f}, llama.cpp {result.ppl_llama:.4f}, gap {result.rel_gap:.4%}")
    assert result.threshold == 0.01 and result.passed, result
