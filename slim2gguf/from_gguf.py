"""A GGUF file as a Hugging Face model directory, so every command can start from one.

gguf-py dequantizes the tensors (any type it knows) to float32, one at a time, and
transformers' GGUF support maps them to Hugging Face names and rebuilds config and
tokenizer; we save that once as a plain safetensors directory in the cache, a shard per
decoder block, so a model larger than memory imports too. Quantizing an already
quantized model compounds the two errors, which is why ``resolve_gguf`` warns of it when
the file is the model to quantize.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from .atomic import atomic_path, file_locked
from .errors import reason
from .messages import WARNING, say
from .paths import IMPORT_RECORD, cache_dir, counted_files, short_digest

COMPOUND_WARNING = (
    "{path} is already quantized ({kind}); quantizing it again compounds both errors "
    "— start from the original float model when you have it"
)

console = Console(stderr=True, markup=False)


class GGUFImportError(ValueError):
    """A GGUF file transformers cannot turn into a float model."""


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


IMPORT_VERSION = 1  # raise it when a change here or in format's dequantizers changes what an import writes


def import_dir() -> Path:
    """The cache folder of the imports this version makes (IMPORT_VERSION, and the
    transformers and gguf-py that map and dequantize the tensors): a folder another version
    made is neither reused, with what that version got wrong, nor replaced under a run of
    that version still reading it."""
    return cache_dir() / "models" / f"import-{_import_key()}"


@functools.lru_cache(maxsize=1)
def _import_key() -> str:
    from importlib.metadata import version

    return short_digest(f"{IMPORT_VERSION}\0{version('transformers')}\0{version('gguf')}")


def import_record(source: dict[str, Any], folder: Path) -> str:
    """What an import folder is made from: the GGUF file (``source``: its path, size and
    time, or a named model's SHA-256), the import's version, and the names and sizes of the
    files made. Written last, so it also marks the folder finished; `paths.model_files`
    counts a folder by it while those files are unchanged."""
    return json.dumps({"source": source, "import": _import_key(), "files": _made_files(folder)}, sort_keys=True)


def imported(target: Path, source: dict[str, Any]) -> bool:
    """Whether ``target`` is a finished import of ``source`` by this version, its files as made."""
    try:
        made = json.loads((target / IMPORT_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(made, dict) and made.get("source") == source and made.get("import") == _import_key() and made.get("files") == _made_files(target)


def _made_files(folder: Path) -> list[list[Any]]:
    """Name and size of each file the record vouches for: written by `import_record`, checked by `imported`."""
    return [[p.name, p.stat().st_size] for p in counted_files(folder)]


def hf_dir_from_gguf(gguf_path: Path, target: Path, source: dict[str, Any]) -> Path:
    """Dequantize ``gguf_path`` (``source`` names it, see `import_record`) into a float32
    Hugging Face directory at ``target`` (once; written under a temporary name, so an
    interrupted run leaves nothing behind). The weights go one decoder block
    per shard, so memory holds one block, not the model."""
    if imported(target, source):
        return target
    sweep_dead_imports(import_dir())  # space is wanted
    from .inspect_gguf import GGUFFileError, open_gguf

    try:
        swapped = open_gguf(gguf_path).byte_order == "S"
    except GGUFFileError as err:
        raise GGUFImportError(str(err)) from err
    if swapped:  # transformers' reader took the byte-swapped version for an unknown one
        raise GGUFImportError(f"cannot import {gguf_path}: it is a big-endian GGUF, and transformers' GGUF reader reads little-endian ones only")
    waiting = Text(f"waiting for another run's import of {gguf_path.name}…")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_locked(target.parent / f".{target.name}.lock", on_wait=lambda: console.print(waiting)):
            if imported(target, source):  # the other run made it
                return target
            if target.exists():  # damaged (a file removed or changed): the rename would fail on it
                shutil.rmtree(target)
            _import(gguf_path, target, source)
    except OSError as err:  # the cache not writable (a full disk is met while writing, below)
        raise GGUFImportError(f"cannot import {gguf_path} into {target.parent}: {reason(err)}") from err
    return target


def _import(gguf_path: Path, target: Path, source: dict[str, Any]) -> None:
    """The import itself, under ``target``'s lock: shards, config, tokenizer, then the record."""
    import torch
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with atomic_path(target) as tmp, console.status(Text(f"dequantizing {gguf_path.name} (once)…")) as status:
        try:
            config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            with init_empty_weights():
                skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            _write_shards(_gguf_tensors(gguf_path, skeleton), tmp, lambda done: status.update(Text(f"dequantizing {gguf_path.name} (once): {done}")))
            # the weights are plain float32 now: save them as such, not as "quantized with gguf"
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.dtype = "float32"
            config.architectures = [type(skeleton).__name__]
            config.save_pretrained(tmp)
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / IMPORT_RECORD).write_text(import_record(source, tmp))
        except KeyError as err:  # a field transformers' reader (or ours) needs; an empty token list reads as none
            raise GGUFImportError(f"cannot import {gguf_path}: reading it as a model needs {err.args[0]!r}, which it lacks or leaves empty") from err
        except (ValueError, NotImplementedError, OSError, RuntimeError, SafetensorError) as err:  # a full disk too
            raise GGUFImportError(f"cannot import {gguf_path}: {_first_line(err)}") from err


def _gguf_tensors(gguf_path: Path, skeleton: Any) -> Iterator[tuple[str, Any]]:
    """Every weight of the file as (Hugging Face name, float32 tensor), one at a time,
    mapped as transformers' GGUF loader maps them: its per-architecture processors undo
    what llama.cpp's converter did (LLaMA's q/k row order, Gemma's norm offsets)."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    parsed["tensors"] = {}
    reader = GGUFReader(gguf_path)
    architecture = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    names = get_gguf_hf_weights_map(skeleton, processor)
    for tensor in reader.tensors:
        result = processor.process(
            weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
        )
        if result.name in names:  # np.array copies: the file's own F32 tensors are read-only views
            yield names[result.name], torch.from_numpy(np.array(result.weights, dtype=np.float32))
    if parsed["tensors"]:
        raise NotImplementedError(f"{gguf_path.name}: its {architecture} tensors are merged across the file, which slim2gguf does not read")


def _write_shards(tensors: Iterable[tuple[str, Any]], directory: Path, progress: Callable[[str], None]) -> None:
    """Safetensors shards of ``tensors``, a new one whenever the decoder block changes,
    and the index that maps each name to its shard."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    files: list[str] = []
    total = 0
    shard: dict[str, Any] = {}
    group = None

    def flush() -> None:
        files.append(f"model-{len(files) + 1:05d}.safetensors")
        save_file(shard, str(directory / files[-1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, files[-1]))
        progress(f"{len(weight_map)} tensors")
        shard.clear()

    for name, tensor in tensors:
        block = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
        if shard and block != group:
            flush()
        group = block
        shard[name] = tensor
        total += tensor.numel() * tensor.element_size()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _file_kind(path: Path) -> str:
    """The dominant type of the file's weight matrices, for the warning (e.g. 'mostly Q4_K'):
    the token embedding and output head are left out, as a Q8_0 embedding outweighs a small
    model's Q4_K linears."""
    from collections import Counter

    from .inspect_gguf import GGUFFileError, open_gguf

    try:
        reader = open_gguf(path)  # SliM types too, as model_dir_of_file reads them
    except GGUFFileError as err:  # a cut header raised IndexError here, past the (ValueError, OSError) it caught
        raise GGUFImportError(str(err)) from err
    if not reader.tensors:
        raise GGUFImportError(f"{path} holds no tensors")
    counts: Counter = Counter()
    for tensor in reader.tensors:
        if tensor.name not in ("token_embd.weight", "output.weight") and len(tensor.shape) >= 2:
            counts[tensor.tensor_type.name] += int(tensor.n_elements)
    if not counts:  # the embedding and head alone
        counts.update({t.tensor_type.name: int(t.n_elements) for t in reader.tensors})
    return f"mostly {counts.most_common(1)[0][0]}"


def resolve_gguf(path: Path, quantizing: bool = False) -> Path:
    """The Hugging Face directory for a user's GGUF file, cached by path, size and mtime;
    ``quantizing`` (the file is the model to quantize), with a one-line warning when its
    weights are quantized already."""
    path = path.expanduser().resolve()
    kind = _file_kind(path)
    if quantizing and kind not in ("mostly F32", "mostly F16", "mostly BF16"):
        say(console, WARNING, COMPOUND_WARNING.format(path=path.name, kind=kind))
    return model_dir_of_file(path)


def model_dir_of_file(path: Path) -> Path:
    """The Hugging Face directory holding exactly the file's weights (SliM tensors too),
    cached by path, size and mtime: what validating a file on its own evaluates."""
    from . import format as fmt

    fmt.register_gguf_types()  # transformers dequantizes through gguf-py: teach it SliM
    path = Path(path).expanduser().resolve()
    source = _file_source(path)
    key = short_digest(f"{path}\0{source['size']}\0{source['mtime_ns']}")
    return hf_dir_from_gguf(path, import_dir() / f"{path.stem}-{key}", source)


def _file_source(path: str | os.PathLike) -> dict[str, Any]:
    """What a user's file's import records of it, and its folder is named by: path, size, time."""
    st = os.stat(path)
    return {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sweep_dead_imports(folder: Path) -> None:
    """Remove the imports in ``folder`` of files that are gone or changed since: their folder
    is named by the file's path, size and time, so nothing can reuse it, and each file
    validated or converted left its float32 copy in the cache for good (0.5 GB for the demo
    model, 6.7 GB for the benchmark model). Called before each import."""
    for record in sorted(folder.glob(f"[!.]*/{IMPORT_RECORD}")):  # not an import being written (a hidden temporary folder)
        try:
            source = json.loads(record.read_text())["source"]
            file = str(source["file"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable, or a named model's record (a digest, no file): kept
        try:
            if _file_source(file) == source:
                continue
        except (FileNotFoundError, NotADirectoryError):
            pass  # the file is gone
        except OSError:
            continue  # cannot tell
        with contextlib.suppress(OSError), file_locked(folder / f".{record.parent.name}.lock"):  # best effort
            shutil.rmtree(record.parent, ignore_errors=True)


def is_gguf(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(".gguf")
