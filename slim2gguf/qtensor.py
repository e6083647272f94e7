"""A quantized weight as the quantizer stores it: codes, fp16 scales/offsets, group widths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import format as fmt


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
