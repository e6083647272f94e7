"""What the pipeline needs of a stock ggml storage type, and nothing more.

A type stores each row in blocks of ``block_size`` columns; a block holds sub-blocks of
``sub_size`` columns, each with a scale and an offset that the type keeps in its own
way (an fp16 scale; or 4-8-bit sub-scales under fp16 super-scales), and one code per
weight, which names a level of the type's table. A weight dequantizes to

    scale[sub] * level[code] + offset[sub]

in float32, with scale and offset computed from the stored fields exactly as ggml
computes them (``sub_scales``). GPTQ fits a block's fields when it reaches the block
(``fit``), then rounds each column against them (``BlockParams.round``; runs of
columns at once for the lattice types, ``BlockParams.round_span``); ``encode``
packs codes and fields into ggml's bytes, ``decode`` reads them back. Every value GPTQ
sees is therefore a value the file stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..threads import every_thread

Fields = dict[str, torch.Tensor]


FIT_ELEMENTS = 1 << 16  # weights fitted at once (256 rows of a 256-wide block): the fit's temporaries stay in cache


class StoredType(Protocol):
    """What checkpoints, the exporter and the readers need of any storage type, SliM's
    mixed-width ones (format.SlimType) and the stock ones (NativeType) alike, so none of
    them branches on the family."""

    @property
    def name(self) -> str: ...

    @property
    def ggml_type(self) -> int:
        """The tensor type id in a GGUF file."""
        ...

    @property
    def bits_per_weight(self) -> float: ...

    def row_bytes(self, n_cols: int) -> int: ...

    def dequantize(self, data: np.ndarray) -> torch.Tensor:
        """Packed rows (uint8 [..., row_bytes]) -> float32 [..., n_cols]: what llama.cpp computes with."""
        ...

    def file_kvs(self) -> dict[str, Any]:
        """``general.file_type`` and the slim2gguf keys of a file whose main type this is."""
        ...


@dataclass
class BlockParams:
    """One block's fitted quantizer for every row: its stored fields ([rows, ...] each)
    and, derived from them, each sub-block's scale and offset ([rows, n_sub])."""

    stype: NativeType
    fields: Fields
    scale: torch.Tensor
    offset: torch.Tensor

    def round(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and stored values of column ``j`` of the block (``w`` [rows])."""
        k = j // self.stype.sub_size
        return self.stype.round(w, self.scale[:, k], self.offset[:, k])

    def round_span(self, w: torch.Tensor, j: int, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and stored values of the block's columns ``j`` .. ``j + span`` (``w`` [rows,
        span]), rounded at once under ``importance`` [span] (types whose weights share a
        grid point or sign bits: storage.lattice)."""
        k = j // self.stype.sub_size
        return self.stype.round(w, self.scale[:, k], self.offset[:, k], importance)

    def round_all(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and stored values of the whole block (``w`` [rows, block_size]), no error feedback."""
        size = self.stype.sub_size
        return self.stype.round(w, self.scale.repeat_interleave(size, 1), self.offset.repeat_interleave(size, 1))


class NativeType(ABC):
    """One stock ggml type; subclasses give its layout, its level table and how its
    scales are stored."""

    name: str
    ggml_type: int
    file_type: int  # llama-quantize's general.file_type for a file mostly of this type
    block_size: int
    type_size: int
    sub_size: int
    levels: tuple[int, ...]
    has_offset = False  # whether ggml adds an offset (a min) to scale * level; else 0 * -d stays -0
    free_fields: tuple[str, ...] = ("d",)  # the fp16 fields a weight is linear in (refit.refit_native solves them)
    span = 1  # weights rounded at once (BlockParams.round_span); 1: each on its own

    def __init__(self) -> None:
        self._levels = torch.tensor(self.levels, dtype=torch.float32)
        self._mids = (self._levels[1:] + self._levels[:-1]) / 2
        self._uniform = self.levels == tuple(range(self.levels[0], self.levels[0] + len(self.levels)))
        # Integer levels have their midpoints on multiples of 1/2, so none lies inside a
        # stretch ((c - 1)/2, c/2]: ceil(2x) names x's stretch, and a table of bucketize
        # over the stretches answers as bucketize does, 6x faster (docs/BENCHMARKS.md).
        doubled = (2 * self._mids).to(torch.long)
        self._first, self._last = int(doubled[0]), int(doubled[-1]) + 1
        self._code_of = torch.bucketize(torch.arange(self._first, self._last + 1) / 2, self._mids)

    @property
    def n_sub(self) -> int:
        return self.block_size // self.sub_size

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def row_bytes(self, n_cols: int) -> int:
        return n_cols // self.block_size * self.type_size

    def file_kvs(self) -> dict[str, Any]:
        return {"file_type": self.file_type, "bits": int(self.bits_per_weight), "group_size": None, "native": self.name}

    def round(
        self, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, importance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest stored value of each weight under (scale, offset) per row (broadcast
        over trailing columns); a zero scale takes the level nearest zero. Weights round
        on their own here, so ``importance`` does not matter."""
        if w.dim() > scale.dim():
            scale, offset = scale[..., None], offset[..., None]
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        codes = self.nearest(torch.where(scale != 0, (w - offset) / safe, torch.zeros_like(w)))
        return codes, self._scaled(scale, self._levels.to(w.device)[codes], offset)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Code of the level nearest to each ``x`` (in units of the scale)."""
        if self._uniform:
            return (torch.round(x) - self.levels[0]).clamp_(0, len(self.levels) - 1).to(torch.long)
        c = torch.ceil(x * 2).nan_to_num_(nan=self._last).clamp_(self._first, self._last).to(torch.long)
        return self._code_of.to(x.device)[c - self._first]

    def values(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """float32 weights [N, block_size] of ``codes`` under per-sub-block scale and offset [N, n_sub]."""
        n = codes.shape[0]
        lev = self._levels[codes.long()].view(n, self.n_sub, self.sub_size)
        return self._scaled(scale[..., None], lev, offset[..., None]).view(n, self.block_size)

    def _scaled(self, scale: torch.Tensor, level: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return scale * level + offset if self.has_offset else scale * level

    def dequantize(self, data: np.ndarray) -> torch.Tensor:
        """Packed rows (uint8 [..., row_bytes]) -> float32 [..., n_cols]."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        if data.shape[-1] % self.type_size:
            raise ValueError(f"{self.name} rows are whole {self.type_size}-byte blocks, got {data.shape[-1]} bytes")
        codes, fields = self.decode(data.reshape(-1, self.type_size))
        scale, offset = self.sub_scales({k: torch.from_numpy(v) for k, v in fields.items()})
        w = self.values(torch.from_numpy(codes), scale, offset)
        return w.reshape(*data.shape[:-1], data.shape[-1] // self.type_size * self.block_size)

    def params(self, fields: Fields) -> BlockParams:
        return BlockParams(self, fields, *self.sub_scales(fields))

    def fit(self, w: torch.Tensor, importance: torch.Tensor) -> BlockParams:
        """The stored fields of one block of every row (``w`` [rows, block_size]), fitted to
        minimize the importance-weighted squared error (``importance`` [block_size]). Rows
        are independent, so they are fitted FIT_ELEMENTS weights at a time, on every thread
        though GPTQ calls this from its one-thread loop (1.3-2.7x faster, docs/BENCHMARKS.md)."""
        step = max(1, FIT_ELEMENTS // self.block_size)
        with every_thread():
            parts = [self._fit_rows(w[r : r + step], importance) for r in range(0, w.shape[0], step)]
        if len(parts) == 1:
            return parts[0]
        return self.params({k: torch.cat([p.fields[k] for p in parts]) for k in parts[0].fields})

    @abstractmethod
    def _fit_rows(self, w: torch.Tensor, importance: torch.Tensor) -> BlockParams:
        """fit for a few rows."""

    @abstractmethod
    def sub_scales(self, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sub-block's float32 scale and offset [N, n_sub], computed as ggml does."""

    @abstractmethod
    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        """Codes [N, block_size] and fields [N, ...] -> ggml blocks uint8 [N, type_size]."""

    @abstractmethod
    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """ggml blocks uint8 [N, type_size] -> codes [N, block_size] and fields [N, ...]."""


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """fp16 values [N] -> their little-endian bytes [N, 2]."""
    return np.ascontiguousarray(values, dtype="<f2").view(np.uint8).reshape(-1, 2)


def fp16_from(data: np.ndarray) -> np.ndarray:
    """Little-endian bytes [N, 2] -> fp16 values [N]."""
    return np.ascontiguousarray(data).view("<f2").reshape(-1).astype(np.float16)


def nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (low & 0x0F) | ((high & 0x0F) << 4)


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16, saturating instead of overflowing to infinity."""
    return x.clamp(-65504, 65504).to(torch.float16)
