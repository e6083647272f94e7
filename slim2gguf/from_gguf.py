"""A GGUF file as a Hugging Face model directory, so every command can start from one.

transformers' GGUF loader dequantizes the tensors (any type its gguf-py knows) to
float32 and rebuilds config and tokenizer; we save that once as a plain safetensors
directory in the cache. Quantizing an already quantized model compounds the two
errors, which is why ``resolve_gguf`` warns.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rich.console import Console

from .atomic import atomic_path
from .paths import cache_dir

COMPOUND_WARNING = (
    "{path} is already quantized ({kind}); quantizing it again compounds both errors "
    "— start from the original float model when you have it"
)

console = Console(stderr=True)


class GGUFImportError(ValueError):
    """A GGUF file transformers cannot turn into a float model."""


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def hf_dir_from_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize ``gguf_path`` into a float32 Hugging Face directory at ``target`` (once;
    written under a temporary name, so an interrupted run leaves nothing behind)."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_path(target) as tmp, console.status(f"dequantizing {gguf_path.name} with transformers (once)…"):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError) as err:
            raise GGUFImportError(f"transformers cannot load {gguf_path}: {_first_line(err)}") from err
        # the weights are plain float32 now: save them as such, not as "quantized with gguf"
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = "float32"
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def _file_kind(path: Path) -> str:
    """The file's dominant tensor type, for the warning (e.g. 'mostly Q4_K')."""
    from collections import Counter

    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise GGUFImportError(f"{path} is not a readable GGUF file: {_first_line(err)}") from err
    counts: Counter = Counter()
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] += int(tensor.n_elements)
    if not counts:
        raise GGUFImportError(f"{path} holds no tensors")
    return f"mostly {counts.most_common(1)[0][0]}"


def resolve_gguf(path: Path) -> Path:
    """The Hugging Face directory for a user's GGUF file, cached by path, size and mtime,
    with a one-line warning when the file is quantized."""
    path = path.expanduser().resolve()
    kind = _file_kind(path)
    if kind not in ("mostly F32", "mostly F16", "mostly BF16"):
        console.print(f"[yellow]warning:[/] {COMPOUND_WARNING.format(path=path.name, kind=kind)}", highlight=False, soft_wrap=True)
    return model_dir_of_file(path)


def model_dir_of_file(path: Path) -> Path:
    """The Hugging Face directory holding exactly the file's weights (SliM tensors too),
    cached by path, size and mtime: what validating a file on its own evaluates."""
    from . import format as fmt

    fmt.register_gguf_types()  # transformers dequantizes through gguf-py: teach it SliM
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return hf_dir_from_gguf(path, cache_dir() / "models" / f"{path.stem}-{key}")


def is_gguf(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(".gguf")
