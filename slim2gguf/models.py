"""Resolving and loading Hugging Face causal LMs: a named model, a GGUF file, a local
directory or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from . import moe, named_models, text_model
from .architectures import SUPPORTED_ARCHITECTURES, tensor_class
from .errors import one_line
from .from_gguf import GGUFImportError, is_gguf, resolve_gguf


class ModelError(ValueError):
    """A model that cannot be found, loaded or quantized."""


def resolve_model(name: str | os.PathLike, quantizing: bool = False) -> Path:
    """A local Hugging Face directory for ``name`` (named model, GGUF file, directory or hub id);
    ``quantizing``: a quantized GGUF file is warned of (quantizing it again compounds the errors)."""
    text = str(name)
    named = named_models.find(text)
    if named is not None:
        try:
            return named_models.model_dir(named)
        except (named_models.NamedModelError, GGUFImportError) as err:
            raise ModelError(str(err)) from err
    path = Path(text).expanduser()
    if is_gguf(text):
        if not path.is_file():
            raise ModelError(f"no GGUF file at {path}")
        try:
            return resolve_gguf(path, quantizing)
        except GGUFImportError as err:
            raise ModelError(str(err)) from err
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
    raise ModelError(
        f"no model directory at {path} (give a directory, a GGUF file, a hub id like org/name, "
        f"or one of {named_models.names()})"
    )


def _config(path: Path):
    """The model's transformers config; a config.json that is not JSON, or not a model's, is a ModelError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path / 'config.json'}: {one_line(err)}") from None


def context_length(path: Path) -> int | None:
    """The longest sequence the model was made for (its text model's
    ``max_position_embeddings``), None where its config does not say."""
    text = _config(path).get_text_config()
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_context(option: str, n: int, longest: int | None) -> None:
    """A ValueError for a window of ``n`` tokens longer than the model's context (``longest``; None
    where it is not known): positions past it are states the model never makes, so neither a
    calibration nor a perplexity there says anything about the model."""
    if longest is not None and n > longest:
        raise ValueError(f"{option} {n} is longer than the model's context ({longest} tokens): give {option} {longest} or less")


def architecture_of(path: Path) -> str:
    config = _config(path)
    arch = (getattr(config, "architectures", None) or ["<none>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"architecture {arch} is not supported; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return arch


def load_model(path: Path) -> nn.Module:
    """The float32 model on the CPU (blocks move to the compute device one at a time),
    each expert of a mixture-of-experts model as linears of its own (moe.unfuse)."""
    from transformers import AutoModelForCausalLM

    architecture_of(path)
    try:
        if text_model.is_multimodal(path):
            model = text_model.load_text_model(path)  # its BlockLoader checks the expert layout
        else:
            text_model.check_expert_layout(text_model.shard_of(path), path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            for name, param in model.named_parameters():
                text_model.check_finite(name, param)
    except text_model.TextModelError as err:
        raise ModelError(str(err)) from err
    except (OSError, SafetensorError) as err:  # weights missing, cut short or unreadable
        raise ModelError(f"cannot load the model in {path}: {one_line(err)}") from None
    model.eval()
    model.config.use_cache = False
    return moe.unfuse(model)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def block_name(index: int) -> str:
    """The module name of decoder block ``index`` in every supported causal LM."""
    return f"model.layers.{index}"


def block_linears(model: nn.Module, index: int) -> dict[str, nn.Linear]:
    """Full module name -> linear for every linear of decoder block ``index`` that slim2gguf
    quantizes (every nn.Linear in a tensor class: architectures.TENSOR_CLASSES)."""
    prefix = block_name(index) + "."
    layer = decoder_layers(model)[index]
    linears = {prefix + name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
    return {name: lin for name, lin in linears.items() if tensor_class(name) is not None}


def block_linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """[out, in] of every linear in the decoder blocks (the ones a checkpoint quantizes),
    from a weightless (meta-device) instance of the model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = moe.unfuse(AutoModelForCausalLM.from_config(text_model.causal_config(model_dir)))
    return linear_shapes_of(model)


def linear_shapes_of(model: nn.Module) -> dict[str, tuple[int, int]]:
    """[out, in] of every linear in the model's decoder blocks."""
    shapes: dict[str, tuple[int, int]] = {}
    for index in range(len(decoder_layers(model))):
        shapes.update({name: tuple(lin.weight.shape) for name, lin in block_linears(model, index).items()})
    return shapes


def set_linear_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Overwrite the named linears' weights (e.g. with dequantized stored values)."""
    modules = dict(model.named_modules())
    for name, weight in weights.items():
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != tuple(weight.shape):
            raise ModelError(f"{name} {tuple(weight.shape)} does not match a linear of this model")
        lin.weight.data = weight.to(lin.weight.dtype)
