"""Read GGUF files holding SliM tensors: open with clear errors, list, dequantize.

Uses PyPI ``gguf`` with our type ids registered (format.register_gguf_types), so
files from the exporter and from stock llama.cpp tools read the same way.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from rich.console import Console
from rich.table import Table

from . import format as fmt
from .architectures import TENSOR_CLASSES
from .errors import one_line

SHOWN_KEYS = ("general.architecture", "general.name", "general.file_type")
SLIM_KEY_PREFIX = "slim2gguf."


class GGUFFileError(ValueError):
    """A file that is missing, not GGUF, corrupt or truncated; the message is one line."""


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A GGUFReader for ``path`` (memory-mapped), or a GGUFFileError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise GGUFFileError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFFileError(f"{path} is not a file")
    fmt.register_gguf_types()
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError) as err:
        reason = one_line(err)
        raise GGUFFileError(f"{path} ({size} bytes) is not a valid GGUF file or is truncated: {reason}") from err
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise GGUFFileError(f"{path} is truncated: tensor {tensor.name} ends past its {size} bytes")
    return reader


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    """Key ``key``'s value (None when absent); a string that is not UTF-8 is a GGUFFileError,
    since gguf decodes strings only when asked."""
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as err:
        raise GGUFFileError(f"key {key} is corrupt: {one_line(err)}") from err


def _numpy_shape(tensor: Any) -> tuple[int, ...]:
    """ggml lists dimensions innermost first; rows-first is how PyTorch shows a weight."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _slim_rows(tensor: Any, stype: fmt.SlimType) -> np.ndarray:
    return np.asarray(tensor.data, dtype=np.uint8).reshape(-1, stype.row_bytes(int(tensor.shape[0])))


def _reader(path_or_reader: str | os.PathLike | gguf.GGUFReader) -> gguf.GGUFReader:
    return path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else open_gguf(path_or_reader)


def inspect_rows(path_or_reader: str | os.PathLike | gguf.GGUFReader) -> list[dict[str, Any]]:
    """One dict per tensor: name, type, shape (rows first), params, bytes, bpw, widths.

    ``bpw`` is None for a stock tensor with no elements (a zero dimension), which GGUF allows.

    ``widths`` (SliM tensors only, else None) counts (row, column-group) quantizer
    groups per width, read from each matrix's first row (a matrix's rows share one pattern;
    a 3-D tensor's experts may differ).
    """
    reader = _reader(path_or_reader)
    rows = []
    for tensor in reader.tensors:
        stype = fmt.type_from_id(tensor.tensor_type)
        widths = None
        if stype is not None:
            if int(tensor.n_elements) == 0:
                raise GGUFFileError(f"tensor {tensor.name} is corrupt: a {stype.name} tensor with no rows or columns")
            packed = _slim_rows(tensor, stype)
            per_matrix = int(tensor.shape[1]) if len(tensor.shape) > 1 else 1
            counts: Counter = Counter()
            try:
                for first in packed[::per_matrix]:
                    counts.update(fmt.read_widths(first, stype, int(tensor.shape[0])).tolist())
            except fmt.FormatError as err:
                raise GGUFFileError(f"tensor {tensor.name} is corrupt: {one_line(err)}") from err
            widths = {int(w): int(n) * per_matrix for w, n in sorted(counts.items())}
        n_params = int(tensor.n_elements)
        rows.append(
            {
                "name": tensor.name,
                "type": tensor.tensor_type.name,
                "shape": _numpy_shape(tensor),
                "params": n_params,
                "bytes": int(tensor.n_bytes),
                "bpw": 8 * int(tensor.n_bytes) / n_params if n_params else None,
                "widths": widths,
            }
        )
    return rows


def _totals(label: str, rows: list[dict[str, Any]]) -> str:
    params = sum(r["params"] for r in rows)
    size = sum(r["bytes"] for r in rows)
    bpw = f", {8 * size / params:.3f} bpw" if params else ""
    return f"{len(rows)} {label}: {params:,} parameters, {size:,} bytes of data{bpw}"


def bpw_table(cells: dict[tuple[int, str], float], title: str) -> Table:
    """Bits per weight of each decoder block (rows) by tensor class (columns)."""
    classes = sorted({c for _, c in cells}, key=lambda c: (list(TENSOR_CLASSES).index(c) if c in TENSOR_CLASSES else 99, c))
    table = Table(title=title)
    table.add_column("block", justify="right")
    for cls in classes:
        table.add_column(cls, justify="right")
    for block in sorted({b for b, _ in cells}):
        table.add_row(str(block), *(f"{cells[block, c]:.2f}" if (block, c) in cells else "" for c in classes))
    return table


def block_cells(rows: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """(block, class) -> bpw for the file's ``blk.N.CLASS.weight`` matrices."""
    cells = {}
    for row in rows:
        parts = row["name"].split(".")
        matrix = len(parts) == 4 and parts[0] == "blk" and parts[1].isdecimal() and parts[3] == "weight" and len(row["shape"]) == 2
        if matrix and row["bpw"] is not None:
            cells[int(parts[1]), parts[2]] = row["bpw"]
    return cells


def printable(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\x1b``): a file's names
    and metadata must not move the terminal's cursor or change its colours."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def print_inspect(path: str | os.PathLike, console: Console | None = None) -> None:
    """A table of the file's tensors, the keys that say what it is, and totals."""
    console = console or Console(markup=False)  # names and metadata may hold [...]
    reader = open_gguf(path)
    for key in reader.fields:
        if key in SHOWN_KEYS or key.startswith(SLIM_KEY_PREFIX):
            value = field_value(reader, key)
            stype = fmt.type_from_id(value) if key == "general.file_type" and isinstance(value, int) else None
            console.print(printable(f"{key} = {value}") + (f" ({stype.name})" if stype else ""))
    rows = inspect_rows(reader)
    table = Table(title=str(path))
    for column in ("tensor", "type", "shape", "bpw", "widths"):
        table.add_column(column, justify="right" if column in ("shape", "bpw") else "left")
    for row in rows:
        widths = row["widths"]
        share = ""
        if widths:
            total = sum(widths.values())
            share = " ".join(f"{w}b:{100 * n / total:.0f}%" for w, n in widths.items())
        bpw = "" if row["bpw"] is None else f"{row['bpw']:.3f}"
        table.add_row(printable(row["name"]), row["type"], " x ".join(map(str, row["shape"])), bpw, share)
    console.print(table)
    console.print(_totals("tensors", rows))
    slim = [r for r in rows if r["widths"] is not None]
    if slim:
        console.print(_totals("SliM tensors", slim))
    cells = block_cells(rows)
    if len(set(cells.values())) > 1:  # a mix (a --bpw file, SliM or stock types): where the bits went
        console.print(bpw_table(cells, "bits per weight by block and tensor class"))


def dequantize_tensor(path_or_reader: str | os.PathLike | gguf.GGUFReader, name: str) -> np.ndarray:
    """Tensor ``name`` as float32, rows first (SliM via format.dequantize, others via gguf.quants)."""
    reader = _reader(path_or_reader)
    tensor = next((t for t in reader.tensors if t.name == name), None)
    if tensor is None:
        raise KeyError(f"no tensor named {name!r} in this GGUF file")
    shape = _numpy_shape(tensor)
    stype = fmt.type_from_id(tensor.tensor_type)
    if stype is not None:
        return fmt.GGUFDequantizer(stype).dequantize(_slim_rows(tensor, stype).reshape(*shape[:-1], -1)).reshape(shape)
    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32).reshape(shape)
