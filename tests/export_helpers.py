"""Builders for the export tests: tiny random HF models and random SliM checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from slim2gguf.checkpoint import CheckpointWriter
from slim2gguf.qtensor import QuantizedTensor

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def random_qtensor(rows: int, cols: int, bits: int, group_size: int, gen: torch.Generator) -> QuantizedTensor:
    """Random codes, scales and offsets under a balanced width pattern from {b-1, b, b+1}."""
    n_groups = cols // group_size
    n_moved = int(torch.randint(0, n_groups // 2 + 1, (), generator=gen))
    widths = torch.full((n_groups,), bits, dtype=torch.uint8)
    widths[:n_moved] = bits + 1
    widths[n_moved : 2 * n_moved] = bits - 1
    widths = widths[torch.randperm(n_groups, generator=gen)]
    shift = (8 - widths).repeat_interleave(group_size)
    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen) >> shift
    d = (torch.rand(rows, n_groups, generator=gen) * 0.05).half()
    d = (d.view(torch.int16) & ~1).view(torch.float16)
    m = (torch.randn(rows, n_groups, generator=gen) * 0.05).half()
    return QuantizedTensor(codes=codes, d=d, m=m, widths=widths, group_size=group_size)


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """[out, in] of each decoder-block linear of a LLaMA/Qwen/Gemma-style config (Phi-3's fused)."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    if config["architectures"][0] == "Phi3ForCausalLM":
        return {
            "self_attn.qkv_proj": (q + 2 * kv, hidden),
            "self_attn.o_proj": (hidden, q),
            "mlp.gate_up_proj": (2 * ffn, hidden),
            "mlp.down_proj": (hidden, ffn),
        }
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }


def write_random_checkpoint(
    target: Path, model_dir: Path, bits: int, group_size: int, seed: int = 0, skip: tuple[str, ...] = ()
) -> dict[str, QuantizedTensor]:
    """A finished checkpoint of random tensors for the block linears of the model at ``model_dir``.

    Every linear is there except the module names in ``skip``.
    """
    config = json.loads((model_dir / "config.json").read_text())
    settings = {
        "model_path": str(model_dir),
        "architecture": config["architectures"][0],
        "bits": bits,
        "group_size": group_size,
        "method": "random",
    }
    n_blocks = config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)
    writer = CheckpointWriter(target, settings, n_blocks)
    everything: dict[str, QuantizedTensor] = {}
    for block in range(n_blocks):
        tensors = {
            f"model.layers.{block}.{lin}": random_qtensor(rows, cols, bits, group_size, gen)
            for lin, (rows, cols) in linear_shapes(config).items()
            if f"model.layers.{block}.{lin}" not in skip
        }
        writer.write_block(block, tensors, {})
        everything.update(tensors)
    writer.finish({})
    return everything


def sentencepiece_tokenizer_dir(target: Path, corpus: Path, vocab_size: int = 512) -> Path:
    """A Gemma-style SentencePiece tokenizer (BPE with byte fallback, no dummy prefix,
    <pad> <eos> <bos> <unk> first) trained on ``corpus``: ``tokenizer.model``, which
    llama.cpp's Gemma 2 converter reads, and the ``tokenizer.json`` transformers makes from it."""
    import tempfile

    import sentencepiece as spm
    from transformers import AutoTokenizer

    source = Path(tempfile.mkdtemp(prefix="spm-"))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(source / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        hard_vocab_limit=False, byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", character_coverage=1.0, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer", "add_bos_token": True}))
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    shutil.copy(source / "tokenizer.model", target / "tokenizer.model")
    shutil.rmtree(source)
    return target


def raw_fields(reader: Any) -> dict[str, bytes]:
    """Each GGUF key's value as stored (comparing bytes is much faster than decoding 49152 tokens)."""
    return {key: b"".join(part.tobytes() for part in field.parts) for key, field in reader.fields.items()}


def tiny_model_dir(target: Path, architecture: str, tokenizer_dir: Path, **overrides: Any) -> Path:
    """A randomly initialized small model saved as a HF directory, with the tokenizer of
    ``tokenizer_dir`` (the demo model's, or sentencepiece_tokenizer_dir's, whose size it takes)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                  "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text", "Phi3ForCausalLM": "phi3",
                  "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}  # fmt: skip
    params = {
        "architectures": [architecture],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": len(AutoTokenizer.from_pretrained(tokenizer_dir)) if (tokenizer_dir / "tokenizer.model").exists() else 49152,
        "max_position_embeddings": 512,
        **overrides,
    }
    torch.manual_seed(0)
    if architecture == "Gemma3ForConditionalGeneration":  # a Gemma 3 text decoder beside a tiny vision tower
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        params.pop("architectures")
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 32, "patch_size": 8}  # fmt: skip
        config = Gemma3Config(text_config=params, vision_config=vision, mm_tokens_per_image=4, architectures=[architecture])
        model = Gemma3ForConditionalGeneration(config)
    else:
        config = AutoConfig.for_model(model_type[architecture], **params)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target)
    for name in (*TOKENIZER_FILES, "tokenizer.model"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, target / name)
    if architecture == "Phi3ForCausalLM":  # a GPT-2 style BPE tokenizer, as Phi-4 has (Phi-3's is SentencePiece)
        tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
        tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
        (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return target


def write_small_gguf(path: Path) -> Path:
    """A GGUF file with one SliM tensor and one F32 tensor and no tokenizer: quick to parse."""
    import gguf

    from slim2gguf import format as fmt

    fmt.register_gguf_types()
    qt = random_qtensor(64, 128, 3, 64, torch.Generator().manual_seed(0))
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tensor("blk.0.ffn_up.weight", qt.pack(), raw_dtype=gguf.GGMLQuantizationType(qt.stype.type_id))
    writer.add_tensor("output_norm.weight", torch.ones(128).numpy())
    finish_gguf(writer)
    return path


def finish_gguf(writer) -> None:
    """Write a gguf-py GGUFWriter's header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
