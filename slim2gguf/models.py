"""Resolving and loading Hugging Face causal LMs: demo name, local directory or hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .architectures import SUPPORTED_ARCHITECTURES
from .demo import demo_model_dir, is_demo_name


class ModelError(ValueError):
    """A model that cannot be found, loaded or quantized."""


def resolve_model(name: str | os.PathLike) -> Path:
    """A local Hugging Face directory for ``name`` (demo name, directory or hub id)."""
    text = str(name)
    if is_demo_name(text):
        return demo_model_dir()
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise ModelError(f"could not fetch '{text}' from the Hugging Face hub (offline?): {err}") from err
    raise ModelError(f"no model directory at {path} (give a directory, a hub id like org/name, or 'smollm2-135m')")


def architecture_of(path: Path) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or ["<none>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"architecture {arch} is not supported; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return arch


def load_model(path: Path) -> nn.Module:
    """The float32 model on the CPU (blocks move to the compute device one at a time)."""
    from transformers import AutoModelForCausalLM

    architecture_of(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return model


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def block_linears(model: nn.Module, index: int) -> dict[str, nn.Linear]:
    """Full module name -> linear for every nn.Linear inside decoder block ``index``."""
    prefix = f"model.layers.{index}."
    layer = decoder_layers(model)[index]
    return {prefix + name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def set_linear_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Overwrite the named linears' weights (e.g. with dequantized stored values)."""
    modules = dict(model.named_modules())
    for name, weight in weights.items():
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != tuple(weight.shape):
            raise ModelError(f"{name} {tuple(weight.shape)} does not match a linear of this model")
        lin.weight.data = weight.to(lin.weight.dtype)
