"""The model architectures slim2gguf quantizes and exports: the one list everything checks.

Keys are Hugging Face ``config.json`` architecture names; values are short family
names. Every decoder linear of these families (``nn.Linear`` in a decoder block) is
quantized, and llama.cpp's converter maps each to one GGUF tensor, permuting rows at
most (LLaMA's q/k head order), which is what the exporter applies to packed rows; it
checks that with a probe, so a family whose converter does more is refused at export.
Where families differ in the forward pass (Gemma's sliding-window and global layers,
its norm offsets and soft-capping), transformers and llama.cpp's converter each do their
part from the config; what the pipeline needs of that is the config's ``layer_types``.
"""

from __future__ import annotations

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # its text decoder (text_model.py); the vision tower is not written
    "Phi3ForCausalLM": "phi3",  # fused qkv_proj and gate_up_proj, kept fused as llama.cpp stores them
}


# Image-text checkpoints whose text decoder slim2gguf quantizes and exports alone, as
# llama.cpp's converter does (text_model.py loads it as its causal LM).
MULTIMODAL_ARCHITECTURES = ("Gemma3ForConditionalGeneration",)


class UnsupportedArchitectureError(ValueError):
    """A model whose architecture slim2gguf cannot quantize or export."""


def model_family(architecture: str) -> str:
    """The short family name of a supported architecture; a clear error for any other."""
    try:
        return SUPPORTED_ARCHITECTURES[architecture]
    except KeyError:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; slim2gguf supports {supported}"
        ) from None


# llama.cpp's name for each class of decoder linear -> the Hugging Face module suffixes it
# covers (Phi-3's fused linears are stored as llama.cpp's attn_qkv and ffn_up): what
# `--tensors` takes, so one class of tensors can be quantized alone.
TENSOR_CLASSES: dict[str, tuple[str, ...]] = {
    "attn_q": ("self_attn.q_proj",),
    "attn_k": ("self_attn.k_proj",),
    "attn_v": ("self_attn.v_proj",),
    "attn_qkv": ("self_attn.qkv_proj",),
    "attn_output": ("self_attn.o_proj",),
    "ffn_gate": ("mlp.gate_proj",),
    "ffn_up": ("mlp.up_proj", "mlp.gate_up_proj"),
    "ffn_down": ("mlp.down_proj",),
}


def parse_tensor_classes(text: str) -> tuple[str, ...]:
    """'ffn_down,attn_v' -> ('attn_v', 'ffn_down') (sorted, so equal selections compare equal)."""
    names = sorted({part.strip() for part in text.split(",") if part.strip()})
    unknown = [n for n in names if n not in TENSOR_CLASSES]
    if unknown or not names:
        raise ValueError(
            f"--tensors takes a comma-separated list of {', '.join(TENSOR_CLASSES)}; got {text!r}"
        )
    return tuple(names)


def tensor_class(module_name: str) -> str | None:
    """llama.cpp's class of a decoder linear (``model.layers.3.mlp.down_proj`` -> ffn_down)."""
    return next(
        (c for c, suffixes in TENSOR_CLASSES.items() if any(module_name.endswith("." + s) for s in suffixes)), None
    )


def in_classes(module_name: str, classes: tuple[str, ...] | None) -> bool:
    """Whether a decoder linear (``model.layers.3.mlp.down_proj``) is in the selection (None: all)."""
    return classes is None or tensor_class(module_name) in classes
