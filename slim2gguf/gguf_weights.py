"""The quantized linears of a slim2gguf file (SliM types, or stock types from
``--format native``), named and ordered as the Hugging Face model has them.

Validation has to evaluate exactly the bytes llama.cpp reads. The file names its
tensors the llama.cpp way, stores some of them (LLaMA's q/k) with rows permuted and a
block's experts stacked, one tensor per kind; the exporter's own probe
(export.converter_mapping) says which linears each tensor holds and how their rows
were moved, so nothing here knows an architecture's names or
permutations, and a reader cannot drift from the writer.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np
import torch

from . import format as fmt
from .export import converter_mapping
from .inspect_gguf import open_gguf
from .models import block_linear_shapes, resolve_model
from .storage import StoredType, stored_type


class GGUFWeightsError(ValueError):
    """A file without SliM tensors, or one that was not made from the given model."""


GGUFSource = str | os.PathLike | gguf.GGUFReader


def _stored_type(tensor: Any, mapping: dict[str, Any]) -> StoredType | None:
    """The SliM type of a tensor, or the stock type of a decoder linear the file quantized
    (a stock-typed embedding or output is not a linear's)."""
    stype = stored_type(tensor.tensor_type)
    return stype if isinstance(stype, fmt.SlimType) or tensor.name in mapping else None


def packed_from_gguf(gguf_path: GGUFSource, model_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, StoredType]]:
    """HF module name -> (packed rows, uint8 [out, row_bytes] in the HF row order; type)
    for every SliM tensor of the file and every decoder linear in a stock quantized type
    (what ``triton_linear.swap_linears`` takes, for SliM types).

    ``gguf_path`` may be an open reader: parsing a file with a real vocabulary takes seconds.
    """
    model_dir = resolve_model(model_dir)
    if isinstance(gguf_path, gguf.GGUFReader):
        reader, gguf_path = gguf_path, gguf_path.data.filename  # the memory map knows its file
    else:
        reader = open_gguf(gguf_path)
    shapes = block_linear_shapes(model_dir)
    mapping = converter_mapping(model_dir, shapes)
    typed = [(t, _stored_type(t, mapping)) for t in reader.tensors]
    quantized = [(t, stype) for t, stype in typed if stype is not None]
    if not quantized:
        raise GGUFWeightsError(f"{gguf_path} holds no SliM or quantized decoder tensors (not a slim2gguf export?)")
    packed: dict[str, tuple[np.ndarray, StoredType]] = {}
    for tensor, stype in quantized:
        entry = mapping.get(tensor.name)
        if entry is None:
            raise GGUFWeightsError(
                f"{gguf_path} holds {tensor.name}, which no decoder linear of {model_dir} becomes: "
                "the file was made from another model"
            )
        modules = entry["modules"]
        cols, rows = int(tensor.shape[0]), int(np.prod([int(n) for n in tensor.shape[1:]]))
        if {shapes[m][1] for m in modules} != {cols} or sum(shapes[m][0] for m in modules) != rows:
            expected = " + ".join(f"{shapes[m][0]}x{shapes[m][1]}" for m in modules)
            raise GGUFWeightsError(
                f"{tensor.name} is {rows}x{cols} in {gguf_path} but holds {expected} of {model_dir}: "
                "the file was made from another model"
            )
        data = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, stype.row_bytes(cols))
        restored = np.empty_like(data)
        restored[np.arange(rows) if entry["rows"] is None else np.asarray(entry["rows"])] = data
        first = 0
        for module in modules:
            packed[module] = (restored[first : first + shapes[module][0]], stype)
            first += shapes[module][0]
    return packed


def slim_weights_from_gguf(gguf_path: GGUFSource, model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """HF module name -> float32 weight dequantized from the file's bytes, rows in HF order:
    ``models.set_linear_weights(model, this)`` makes the model compute with what the file holds."""
    weights = {}
    for module, (rows, stype) in packed_from_gguf(gguf_path, model_dir).items():
        try:
            weights[module] = stype.dequantize(rows)
        except ValueError as err:
            raise GGUFWeightsError(f"the tensor for {module} in {gguf_path} is corrupt: {err}") from err
    return weights
