"""The model architectures slim2gguf quantizes and exports: the one list everything checks.

Keys are Hugging Face ``config.json`` architecture names; values are short family
names. Every family listed here has the seven SliM-quantized linears per decoder
block (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``), and
llama.cpp's converter maps each of them to one GGUF tensor, permuting rows at most
(LLaMA's q/k head permutation), which is what the exporter can apply to packed rows.
"""

from __future__ import annotations

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


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


# llama.cpp's name for each quantized linear of a decoder block -> its Hugging Face module
# suffix: what `--tensors` takes, so one class of tensors can be quantized alone.
TENSOR_CLASSES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
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


def in_classes(module_name: str, classes: tuple[str, ...] | None) -> bool:
    """Whether a decoder linear (``model.layers.3.mlp.down_proj``) is in the selection (None: all)."""
    return classes is None or any(module_name.endswith("." + TENSOR_CLASSES[c]) for c in classes)


def tensor_class(module_name: str) -> str | None:
    """llama.cpp's class of a decoder linear (``model.layers.3.mlp.down_proj`` -> ffn_down)."""
    return next((c for c, suffix in TENSOR_CLASSES.items() if module_name.endswith("." + suffix)), None)
