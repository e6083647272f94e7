"""The causal language model a checkpoint holds, and where its decoder weights sit in the files.

A plain causal LM (``LlamaForCausalLM``, ...) is itself. A multimodal checkpoint
(``Gemma3ForConditionalGeneration``: a vision tower and a projector beside a Gemma 3 text
decoder) holds one under a prefix that depends on who saved it (``language_model.model.``
in Google's releases, ``model.language_model.`` in newer saves); llama.cpp's converter
writes only that decoder into the GGUF file (the vision part goes to a separate mmproj
file). slim2gguf loads the decoder alone as the matching causal LM, so the pipeline sees
the usual module names (``model.layers.N...``), and maps them back to the files' names
for the exporter. ``BlockLoader`` reads any of these models from its safetensors files a
block at a time, so quantizing needs the memory of one block, not of the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import FILE_RENAMES, MULTIMODAL_ARCHITECTURES, SUPPORTED_ARCHITECTURES
from .errors import check_readable, reason
from .moe import unfuse

PLAIN_PREFIX = "model."
PROBE = "layers.0.self_attn.q_proj.weight"  # a weight every supported text decoder has
CHECK_ELEMENTS = 1 << 24  # stored values read at once by BlockLoader.check_unread (32 MiB of bf16)


class TextModelError(ValueError):
    """A checkpoint whose text decoder cannot be read from its files (not found, or damaged)."""


def check_finite(name: str, value: torch.Tensor) -> None:
    """Refuse a NaN or infinite weight, naming it: it would reach the file unseen, or stop
    GPTQ with a Cholesky failure that blames the damping."""
    if not bool(torch.isfinite(value).all()):
        raise TextModelError(f"{name} holds NaN or infinite values: the model's weights are damaged")


def architecture(model_dir: Path) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("architectures") or ["<none>"])[0]


def is_multimodal(model_dir: Path) -> bool:
    return architecture(model_dir) in MULTIMODAL_ARCHITECTURES


def causal_config(model_dir: Path) -> Any:
    """The transformers config of the causal LM: the text config of a multimodal checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config.get_text_config() if is_multimodal(model_dir) else config


@contextlib.contextmanager
def open_shard(shard: Path) -> Iterator[Any]:
    """safe_open on a safetensors file; one cut short, missing or unreadable (when opened or
    while a tensor is read) is a one-line TextModelError, not safetensors' traceback."""
    from safetensors import SafetensorError, safe_open

    try:
        check_readable(shard)
        with safe_open(str(shard), "pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise TextModelError(f"cannot read {shard}: {reason(err)}") from None


def shard_of(model_dir: Path) -> dict[str, Path]:
    """Every tensor name in the model's safetensors files -> the shard holding it (from
    the index, or the shards' headers)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: model_dir / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
    where: dict[str, Path] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with open_shard(shard) as f:
            where.update(dict.fromkeys(f.keys(), shard))
    return where


def weight_prefix(model_dir: Path, names: Iterable[str] | None = None) -> str:
    """What comes before ``layers.N...`` in the files' names of the decoder's weights
    (``names``: the files' tensor names, when the caller has read them already)."""
    if not is_multimodal(model_dir):
        return PLAIN_PREFIX
    found = {name[: -len(PROBE)] for name in (shard_of(model_dir) if names is None else names) if name.endswith(PROBE)}
    text = sorted(p for p in found if "language_model" in p)
    if len(text) != 1:
        raise TextModelError(f"{model_dir}: cannot tell the text decoder's weights apart (found prefixes {sorted(found)})")
    return text[0]


def check_expert_layout(names: Iterable[str], model_dir: Path) -> None:
    """Refuse a checkpoint whose experts are stored fused (3-D ``mlp.experts.gate_up_proj``):
    slim2gguf quantizes, and llama.cpp's converter stacks, one tensor per expert projection."""
    fused = next((n for n in names if n.endswith(".experts.gate_up_proj")), None)
    if fused is not None:
        raise TextModelError(
            f"{model_dir} stores its experts fused ({fused}); slim2gguf reads checkpoints with one tensor "
            "per expert projection (mlp.experts.N.gate_proj, ...), as their publishers release them"
        )


def file_renames(model_dir: Path) -> tuple[tuple[str, str], ...]:
    """How the model's files name modules otherwise than transformers (architectures.FILE_RENAMES)."""
    return FILE_RENAMES.get(SUPPORTED_ARCHITECTURES.get(architecture(model_dir), ""), ())


def file_name(module: str, prefix: str, renames: tuple[tuple[str, str], ...] = ()) -> str:
    """The files' name of a decoder module (``model.layers.3.mlp.down_proj``) under ``prefix``,
    with the family's ``renames`` (file_renames)."""
    name = module.removeprefix(PLAIN_PREFIX)
    for ours, theirs in renames:
        name = name.replace(ours, theirs)
    return prefix + name


def load_text_model(model_dir: Path) -> nn.Module:
    """The text decoder of a multimodal checkpoint as its causal LM, whole, float32 on the CPU."""
    loader = BlockLoader(model_dir)
    loader.load("model")
    loader.load("lm_head")
    return loader.skeleton


class BlockLoader:
    """The causal LM with its weights read from the safetensors files only when needed.

    ``skeleton`` is the model with every parameter on the meta device (buffers, such as
    the rotary frequencies, are real); ``load(prefix)`` reads the parameters under a
    module name (``model.embed_tokens``, ``model.layers.3``) in their stored dtype and
    casts them to float32, ``release(prefix)`` returns them to the meta device. Host
    memory then holds what is loaded: the token embedding and one decoder block while
    the pipeline quantizes, whatever the depth of the model.
    """

    def __init__(self, model_dir: Path):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.shard_of = shard_of(self.model_dir)
        check_expert_layout(self.shard_of, self.model_dir)
        self.prefix = weight_prefix(self.model_dir, self.shard_of)
        self.renames = file_renames(self.model_dir)
        with init_empty_weights(include_buffers=False):
            self.skeleton = unfuse(AutoModelForCausalLM.from_config(causal_config(self.model_dir), dtype=torch.float32))
        self.skeleton.eval()
        self.skeleton.config.use_cache = False
        self.tied = bool(self.skeleton.config.tie_word_embeddings)

    def _stored_name(self, param: str) -> str:
        if param == "lm_head.weight":
            heads = [self.prefix.removesuffix("model.") + param, param]
            return next((h for h in heads if h in self.shard_of), heads[-1])
        return file_name(param, self.prefix, self.renames)

    def load(self, module: str) -> None:
        """Read every parameter under ``module`` from the files (float32, on the CPU)."""
        from accelerate.utils import set_module_tensor_to_device

        wanted = [n for n, p in self.skeleton.named_parameters(remove_duplicate=False) if n.startswith(module + ".") and p.is_meta]
        by_shard: dict[Path, list[tuple[str, str]]] = {}
        for name in wanted:
            if name == "lm_head.weight" and self.tied:
                continue
            stored = self._stored_name(name)
            if stored not in self.shard_of:
                raise TextModelError(f"{self.model_dir} has no weight {stored}")
            by_shard.setdefault(self.shard_of[stored], []).append((name, stored))
        for shard, pairs in by_shard.items():
            with open_shard(shard) as f:
                for name, stored in pairs:
                    value = f.get_tensor(stored).float()
                    check_finite(stored, value)
                    set_module_tensor_to_device(self.skeleton, name, "cpu", value=value)
        if self.tied and module in ("model", "model.embed_tokens", "lm_head"):
            self.skeleton.tie_weights()

    def check_unread(self, read: tuple[str, ...]) -> None:
        """Refuse NaN or infinite values in every stored weight outside the modules ``read``
        (the pipeline reads the embedding and the blocks; the final norm and an untied head
        reach the file through the exporter, unseen). Read CHECK_ELEMENTS at a time, so
        memory stays flat whatever the head's size."""
        names = [n for n, _ in self.skeleton.named_parameters()]
        unread = [n for n in names if not n.startswith(tuple(m + "." for m in read)) and not (n == "lm_head.weight" and self.tied)]
        for name in unread:
            stored = self._stored_name(name)
            if stored not in self.shard_of:
                continue  # load() names what is missing when it is needed
            with open_shard(self.shard_of[stored]) as f:
                part = f.get_slice(stored)
                shape = part.get_shape()
                if len(shape) < 2:  # a norm's vector: small
                    check_finite(stored, f.get_tensor(stored))
                    continue
                step = max(1, CHECK_ELEMENTS // math.prod(shape[1:]))
                for r in range(0, shape[0], step):
                    check_finite(stored, part[r : r + step])

    def release(self, module: str) -> None:
        """Free the parameters under ``module`` (back to the meta device)."""
        self.skeleton.get_submodule(module).to("meta")
        trim_heap()


def trim_heap() -> None:
    """Hand freed heap memory back to the OS. glibc raises its mmap threshold as large
    tensors are freed, so later ones come from its arenas, which keep what is freed:
    measured, host memory then grew by 15 % of a block's float32 size for every block."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do
