"""Host side of the Triton kernels: a packed SliM tensor plus its per-tensor group table.

The kernels read the packed bytes exactly as ``slim2gguf.format.pack`` returns them and
as they lie in the GGUF file. Every group is ``4 + G/32 * 4k`` bytes, a multiple of 4,
and so is every row, so every group header and every bit plane starts on a 4-byte
boundary: the kernels read the rows as little-endian int32 words, never a word that
straddles two groups. All rows share one width pattern, so one small table, built once
at load, tells every row where its groups are: the groups sorted by width class
(``b-1``, ``b``, ``b+1``), each with its column-group index and header word offset.
The kernels loop over one class at a time with the width as a compile-time constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slim2gguf.format import (
    HEADER_BYTES,
    FormatError,
    SlimType,
    check_widths,
    decode_header,
    group_offsets,
    read_widths,
)


@dataclass(frozen=True)
class GroupTable:
    """Groups of one tensor sorted by width class; shared by all its rows."""

    group_index: np.ndarray  # int32 [n_groups]: column group of each sorted entry
    group_word: np.ndarray  # int32 [n_groups]: its header's word offset inside a row
    counts: tuple[int, int, int]  # entries of width b-1, b, b+1, in that order

    @classmethod
    def from_widths(cls, widths: np.ndarray, stype: SlimType) -> GroupTable:
        widths = np.asarray(widths, dtype=np.int64)
        order = np.argsort(widths, kind="stable")
        words = group_offsets(widths, stype.group_size) // 4
        counts = tuple(int(np.count_nonzero(widths == w)) for w in stype.widths)
        return cls(order.astype(np.int32), words[order].astype(np.int32), counts)


def read_table(data: np.ndarray, stype: SlimType, in_features: int) -> GroupTable:
    """Validate packed rows (docs/FORMAT.md, "Rules for files") and build their table.

    Reads only the headers, so it is cheap even for large tensors.
    """
    if in_features % stype.group_size:
        raise FormatError(f"{in_features} columns are not a multiple of group size {stype.group_size}")
    if data.ndim != 2 or data.shape[1] != stype.row_bytes(in_features) or data.shape[0] == 0:
        raise FormatError(
            f"{stype.name} rows of {in_features} columns take {stype.row_bytes(in_features)} bytes, "
            f"got shape {data.shape}"
        )
    widths = read_widths(data[0], stype, in_features)
    check_widths(widths, stype)
    offsets = group_offsets(widths, stype.group_size)
    d, m, code = decode_header(data[:, offsets[:, None] + np.arange(HEADER_BYTES)])
    if np.any(code != code[:1]):
        raise FormatError("rows of one tensor must share one width pattern")
    if not (np.isfinite(d).all() and np.isfinite(m).all()):
        raise FormatError("scales and offsets must be finite")
    return GroupTable.from_widths(widths, stype)


@dataclass(frozen=True)
class SlimTensor:
    """What the kernels need of one weight: packed bytes on the device and its table."""

    packed: torch.Tensor  # uint8 [out_features, row_bytes], 4-byte aligned
    group_index: torch.Tensor  # int32 [n_groups], same device
    group_word: torch.Tensor  # int32 [n_groups], same device
    counts: tuple[int, int, int]
    stype: SlimType
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def words(self) -> torch.Tensor:
        """The packed rows as int32 words (a view: no copy)."""
        return self.packed.view(torch.int32)

    @classmethod
    def from_packed(
        cls,
        data: np.ndarray | torch.Tensor,
        stype: SlimType,
        in_features: int,
        device: torch.device | str | None = None,
    ) -> SlimTensor:
        """Validate packed rows and put them and their table on ``device``.

        ``device`` defaults to the tensor's own device (CPU for a numpy array).
        """
        if isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8:
                raise FormatError(f"packed data must be uint8, got {data.dtype}")
            table = read_table(data.detach().cpu().numpy(), stype, in_features)
            packed = data.detach().to(device or data.device)
        else:
            array = np.asarray(data)
            if array.dtype != np.uint8:
                raise FormatError(f"packed data must be uint8, got {array.dtype}")
            table = read_table(array, stype, in_features)
            packed = torch.tensor(array, device=device)
        packed = packed.contiguous()
        if packed.storage_offset() % 4:
            packed = packed.clone()
        return cls(
            packed,
            torch.as_tensor(table.group_index, device=packed.device),
            torch.as_tensor(table.group_word, device=packed.device),
            table.counts,
            stype,
            in_features,
        )
