"""A quantized weight as the quantizer stores it: SliM codes, fp16 scales/offsets and group
widths, or a stock ggml type's packed rows. Both answer the same questions (its type,
shape, packed rows, dequantized weights, checkpoint tensors and manifest entry), so
checkpoints, export and evaluation never ask which family a weight is in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import format as fmt
from .storage import BlockParams, NativeType, native_type


@dataclass
class QuantizedTensor:
    """Weight ``[out, in]`` in the stored representation of docs/FORMAT.md.

    ``codes`` uint8 [out, in]; ``d``, ``m`` float16 [out, groups]; ``widths`` uint8 [groups].
    """

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    widths: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def bits(self) -> int:
        """Average width; exact by construction (SliM's balanced allocation)."""
        total = int(self.widths.sum())
        if total % self.widths.numel():
            raise fmt.FormatError(f"widths average {total / self.widths.numel():.3f}, not an integer")
        return total // self.widths.numel()

    @property
    def stype(self) -> fmt.SlimType:
        return fmt.slim_type(self.bits, self.group_size)

    def group_widths(self) -> list[int]:
        return self.widths.tolist()

    def meta(self) -> dict[str, Any]:
        """The checkpoint manifest's entry for this tensor (beside its block and shape)."""
        return {"bits": self.bits, "group_size": self.group_size, "widths": self.widths.tolist()}

    def dequantize(self) -> torch.Tensor:
        """float32 weights: ``f32(d) * q + f32(m)``, the same bits every kernel produces."""
        rows, cols = self.codes.shape
        q = self.codes.view(rows, cols // self.group_size, self.group_size).float()
        w = q * self.d.float().unsqueeze(-1) + self.m.float().unsqueeze(-1)
        return w.view(rows, cols)

    def pack(self) -> np.ndarray:
        """Packed rows (uint8 [out, row_bytes]) exactly as they go into the GGUF file."""
        return fmt.pack(
            self.codes.numpy(), self.d.numpy(), self.m.numpy(), self.widths.numpy(), self.stype
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.codes": self.codes.contiguous(),
            f"{prefix}.d": self.d.contiguous(),
            f"{prefix}.m": self.m.contiguous(),
            f"{prefix}.widths": self.widths.contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, group_size: int) -> QuantizedTensor:
        return cls(
            codes=tensors[f"{prefix}.codes"],
            d=tensors[f"{prefix}.d"],
            m=tensors[f"{prefix}.m"],
            widths=tensors[f"{prefix}.widths"],
            group_size=group_size,
        )


@dataclass
class NativeTensor:
    """Weight ``[out, in]`` in a stock ggml type: its rows packed exactly as the GGUF file
    holds them (uint8 [out, row_bytes]); PyTorch evaluates their dequantization."""

    type_name: str
    data: torch.Tensor
    n_cols: int

    @property
    def stype(self) -> NativeType:
        return native_type(self.type_name)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.n_cols)

    @classmethod
    def from_blocks(cls, stype: NativeType, codes: torch.Tensor, fitted: list[BlockParams]) -> NativeTensor:
        """Pack GPTQ's codes (uint8 [rows, cols]) and each block's fitted fields."""
        rows, cols = codes.shape
        n = rows * len(fitted)
        fields = {
            key: torch.stack([p.fields[key].cpu() for p in fitted], dim=1).reshape(n, *fitted[0].fields[key].shape[1:]).numpy()
            for key in fitted[0].fields
        }
        blocks = stype.encode(codes.reshape(n, stype.block_size).numpy(), fields)
        return cls(stype.name.lower(), torch.from_numpy(blocks.reshape(rows, -1)), cols)

    def group_widths(self) -> list[int]:
        """Empty: a stock type has no per-group widths."""
        return []

    def meta(self) -> dict[str, Any]:
        return {"type": self.type_name}

    def dequantize(self) -> torch.Tensor:
        return self.stype.dequantize(self.data.numpy())

    def pack(self) -> np.ndarray:
        return self.data.numpy()

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.data": self.data.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, type_name: str, n_cols: int) -> NativeTensor:
        """Raises ValueError for rows that are not whole ``type_name`` rows of ``n_cols`` columns."""
        nt = cls(type_name, tensors[f"{prefix}.data"], n_cols)
        if nt.data.dtype != torch.uint8 or nt.data.dim() != 2 or nt.data.shape[1] != nt.stype.row_bytes(n_cols):
            raise ValueError(f"{prefix} is not {type_name} rows of {n_cols} columns")
        return nt


StoredTensor = QuantizedTensor | NativeTensor


def stored_tensor(tensors: dict[str, torch.Tensor], prefix: str, meta: dict[str, Any], group_size: int) -> StoredTensor:
    """The tensor ``prefix`` of a checkpoint block from its manifest entry (``meta()``, plus
    its shape); ``group_size`` is the run's, for SliM entries that do not name theirs.
    Raises KeyError for a missing tensor, ValueError for a corrupt one."""
    if "type" in meta:
        return NativeTensor.from_tensors(tensors, prefix, meta["type"], meta["shape"][1])
    return QuantizedTensor.from_tensors(tensors, prefix, meta.get("group_size", group_size))
