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
