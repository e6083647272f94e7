"""Each family beyond LLaMA/Qwen end to end on a tiny random-weight model built from a
transformers config (with the demo model's tokenizer): `slim2gguf convert` at 4 bits, patched
llama.cpp dequantizes every SliM tensor bit for bit as PyTorch does, the two perplexities agree
within 1 % (`slim2gguf validate`), and a completion runs.

Gemma 2's converter reads a SentencePiece tokenizer: its model gets one trained on the test
text (export_helpers.sentencepiece_tokenizer_dir), and four layers alternating sliding-window
and global, as llama.cpp's Gemma 2 does. Gemma 3 has six layers (llama.cpp's fixed pattern:
five sliding-window layers, then a global one). Both have a window shorter than the
evaluation context, so both kinds of layer matter, and llama.cpp's query scale
(1/sqrt(head_dim)), as every released Gemma 2 and 3 but the 27B has. The multimodal Gemma 3
checkpoint has a small vision tower beside the same decoder; only the decoder is written.
The mixture-of-experts models (Qwen 2 MoE with its shared expert, Qwen 3 MoE, Mixtral) have
four experts, two per token; llama.cpp stacks each block's experts of a kind into one SliM
tensor, which its MUL_MAT_ID runs. Every file's KV section is the converter's own, byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slim2gguf import format as fmt
from slim2gguf import llamacpp
from slim2gguf.inspect_gguf import dequantize_tensor, open_gguf

pytestmark = pytest.mark.e2e

MOE = {"num_experts": 4, "num_experts_per_tok": 2}
FAMILIES = {
    "gemma2": ("Gemma2ForCausalLM", {"num_hidden_layers": 4, "sliding_window": 32, "query_pre_attn_scalar": 32}),
    "gemma3": ("Gemma3ForCausalLM", {"num_hidden_layers": 6, "sliding_window": 32, "query_pre_attn_scalar": 32}),
    "gemma3-multimodal": (
        "Gemma3ForConditionalGeneration", {"num_hidden_layers": 6, "sliding_window": 32, "query_pre_attn_scalar": 32}
    ),
    "phi3": ("Phi3ForCausalLM", {"tie_word_embeddings": False}),
    "qwen2moe": ("Qwen2MoeForCausalLM", MOE | {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 128}),
    "qwen3moe": ("Qwen3MoeForCausalLM", MOE | {"moe_intermediate_size": 64}),
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def slim2gguf(*args: str | os.PathLike | int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slim2gguf", *map(str, args)], capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory, tiny_text) -> tuple[Path, Path]:
    from export_helpers import sentencepiece_tokenizer_dir, tiny_model_dir

    from slim2gguf.named_models import demo_model_dir

    llamacpp.build()
    architecture, config = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tokenizer = sentencepiece_tokenizer_dir(root / "spm", tiny_text) if request.param == "gemma2" else demo_model_dir()
    model = tiny_model_dir(root / "model", architecture, tokenizer, **config)
    out = root / f"{request.param}-slim4.gguf"
    r = slim2gguf("convert", model, "-o", out, "--bits", 4, "--group-size", 32, "--calib", tiny_text,
                  "--nsamples", 8, "--seqlen", 64)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return model, out


def test_llama_cpp_dequantizes_every_slim_tensor_as_pytorch(converted, tmp_path):
    _, path = converted
    dump = llamacpp.binary(llamacpp.DUMP_TOOL)
    reader = open_gguf(path)
    slim = [t for t in reader.tensors if fmt.type_from_id(t.tensor_type) is not None]
    assert slim
    for tensor in slim:
        out = tmp_path / "t.f32"
        r = subprocess.run([str(dump), str(path), "dequant", tensor.name, str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        expected = dequantize_tensor(reader, tensor.name)
        got = np.fromfile(out, dtype=np.float32).reshape(expected.shape)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), tensor.name


def test_metadata_and_tokenizer_are_the_converters(converted, tmp_path):
    from export_helpers import raw_fields

    model, path = converted
    upstream = tmp_path / "upstream.gguf"
    cmd = [sys.executable, str(llamacpp.ensure_source() / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32", "--outfile", str(upstream)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    mine = {k: v for k, v in raw_fields(open_gguf(path)).items() if not k.startswith("slim2gguf.")}
    theirs = raw_fields(open_gguf(upstream))
    assert list(mine) == list(theirs)
    assert {k for k in mine if mine[k] != theirs[k]} == {"general.file_type", "GGUF.kv_count"}


def test_perplexities_agree_and_a_completion_runs(converted, tiny_text):
    model, path = converted
    v = slim2gguf("validate", path, "--model", model, "--text", tiny_text, "--ctx", 128, "--chunks", 4)
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-2000:]
    r = slim2gguf("run", path, "-p", "The capital of France is", "-n", 8)
    assert r.returncode == 0 and r.stdout.startswith("The capital of France is"), r.stderr[-2000:]
