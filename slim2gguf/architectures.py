"""The model architectures slim2gguf quantizes and exports: the one list everything checks.

Keys are Hugging Face ``config.json`` architecture names; values are short family
names. Every decoder linear of these families (``nn.Linear`` in a decoder block) is
quantized, and llama.cpp's converter maps each to one GGUF tensor, permuting rows at
most (LLaMA's q/k head order), which is what the exporter applies to packed rows; it
checks that with a probe, so a family whose converter does more is refused at export.
Where families differ in the forward pass (Gemma's sliding-window and global layers,
its norm offsets and soft-capping), transformers and llama.cpp's converter each do their
part from the config; what the pipeline needs of that is the config's ``layer_types``.
Mixture-of-experts families differ in data only: the names of an expert's three linears
and where their checkpoints keep the MoE block (moe.py makes each expert's linears
``nn.Linear``s, which the converter stacks into one tensor per kind and block).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # its text decoder (text_model.py); the vision tower is not written
    "Phi3ForCausalLM": "phi3",  # fused qkv_proj and gate_up_proj, kept fused as llama.cpp stores them
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "MixtralForCausalLM": "mixtral",
}

# Mixture-of-experts families -> the names of each expert's gate, up and down linears, as
# their checkpoints (and llama.cpp's converter) name them: ``mlp.experts.E.<name>``.
EXPERT_LINEARS: dict[str, tuple[str, str, str]] = {
    "qwen2moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3moe": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
}

# Where a family's checkpoints name a module otherwise than transformers does (module
# name part -> the files' part): Mixtral's files keep the MoE block as block_sparse_moe.
FILE_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": ((".mlp.", ".block_sparse_moe."),),
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


# llama.cpp's name for each class of decoder linear -> the Hugging Face module name
# patterns it covers (fnmatch, ``*`` an expert's number; Phi-3's fused linears are stored
# as llama.cpp's attn_qkv and ffn_up): what `--tensors` takes, so one class of tensors
# can be quantized alone. A block's linear in no class (Qwen MoE's one-row shared-expert
# gate) is not quantized: llama.cpp keeps it F32, as it does the router.
TENSOR_CLASSES: dict[str, tuple[str, ...]] = {
    "attn_q": ("self_attn.q_proj",),
    "attn_k": ("self_attn.k_proj",),
    "attn_v": ("self_attn.v_proj",),
    "attn_qkv": ("self_attn.qkv_proj",),
    "attn_output": ("self_attn.o_proj",),
    "ffn_gate": ("mlp.gate_proj",),
    "ffn_up": ("mlp.up_proj", "mlp.gate_up_proj"),
    "ffn_down": ("mlp.down_proj",),
    "ffn_gate_exps": ("mlp.experts.*.gate_proj", "mlp.experts.*.w1"),
    "ffn_up_exps": ("mlp.experts.*.up_proj", "mlp.experts.*.w3"),
    "ffn_down_exps": ("mlp.experts.*.down_proj", "mlp.experts.*.w2"),
    "ffn_gate_shexp": ("mlp.shared_expert.gate_proj",),
    "ffn_up_shexp": ("mlp.shared_expert.up_proj",),
    "ffn_down_shexp": ("mlp.shared_expert.down_proj",),
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
        (c for c, patterns in TENSOR_CLASSES.items() if any(fnmatchcase(module_name, "*." + p) for p in patterns)), None
    )


def in_classes(module_name: str, classes: tuple[str, ...] | None) -> bool:
    """Whether a decoder linear (``model.layers.3.mlp.down_proj``) is quantized with the
    selection (None: every class)."""
    cls = tensor_class(module_name)
    return cls is not None and (classes is None or cls in classes)
