"""ggml's 32-wide types with one fp16 scale per block: Q4_0, Q5_0, Q8_0, where a weight
is ``d * (code - zero)`` (levels centred on 0), and Q4_1, Q5_1, where it is ``d * code + m``.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from .base import BlockParams, Fields, NativeType, fp16_bytes, fp16_from, nibbles, to_fp16
from .fitting import fit_affine, fit_symmetric, weights_of


class ScaledBlock(NativeType):
    """One fp16 scale (either sign) per 32 weights."""

    block_size = 32
    sub_size = 32

    def _fit_rows(self, w: torch.Tensor, importance: torch.Tensor) -> BlockParams:
        x = w.float().view(w.shape[0], 1, self.block_size)
        s = fit_symmetric(x, weights_of(importance, (1, self.block_size)), self._levels, self.nearest)
        return self.params({"d": to_fp16(s[:, 0])})

    def sub_scales(self, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        d = fields["d"].float()[:, None]
        return d, torch.zeros_like(d)


class Q4_0(ScaledBlock):
    """d (fp16), 16 bytes: low nibbles hold weights 0-15, high nibbles 16-31."""

    name = "Q4_0"
    ggml_type = int(QT.Q4_0)
    file_type = int(LlamaFileType.MOSTLY_Q4_0)
    type_size = 18
    levels = tuple(range(-8, 8))

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([fp16_bytes(fields["d"]), nibbles(codes[:, :16], codes[:, 16:])], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        qs = blocks[:, 2:]
        return np.concatenate([qs & 0x0F, qs >> 4], axis=1), {"d": fp16_from(blocks[:, :2])}


class Q5_0(ScaledBlock):
    """d (fp16), 4 bytes with the fifth bit of weight i at bit i, 16 bytes of low nibbles as Q4_0."""

    name = "Q5_0"
    ggml_type = int(QT.Q5_0)
    file_type = int(LlamaFileType.MOSTLY_Q5_0)
    type_size = 22
    levels = tuple(range(-16, 16))

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        qh = np.packbits((codes >> 4) & 1, axis=1, bitorder="little")
        return np.concatenate([fp16_bytes(fields["d"]), qh, nibbles(codes[:, :16], codes[:, 16:])], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        high = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little")
        qs = blocks[:, 6:]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        return low | (high << 4), {"d": fp16_from(blocks[:, :2])}


class Q8_0(ScaledBlock):
    """d (fp16), 32 int8 weights; code c stores the int8 c - 128."""

    name = "Q8_0"
    ggml_type = int(QT.Q8_0)
    file_type = int(LlamaFileType.MOSTLY_Q8_0)
    type_size = 34
    levels = tuple(range(-128, 128))

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([fp16_bytes(fields["d"]), codes.astype(np.uint8) ^ 0x80], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return blocks[:, 2:] ^ 0x80, {"d": fp16_from(blocks[:, :2])}


class ScaledBlockWithMin(NativeType):
    """An fp16 scale and an fp16 offset (any sign) per 32 weights."""

    block_size = 32
    sub_size = 32
    has_offset = True
    free_fields = ("d", "m")

    def _fit_rows(self, w: torch.Tensor, importance: torch.Tensor) -> BlockParams:
        x = w.float().view(w.shape[0], 1, self.block_size)
        d, m = fit_affine(x, weights_of(importance, (1, self.block_size)), len(self.levels) - 1, signed_offset=True)
        return self.params({"d": to_fp16(d[:, 0]), "m": to_fp16(m[:, 0])})

    def sub_scales(self, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        return fields["d"].float()[:, None], fields["m"].float()[:, None]


class Q4_1(ScaledBlockWithMin):
    """d, m (fp16), then Q4_0's 16 bytes of nibbles."""

    name = "Q4_1"
    ggml_type = int(QT.Q4_1)
    file_type = int(LlamaFileType.MOSTLY_Q4_1)
    type_size = 20
    levels = tuple(range(16))

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        head = [fp16_bytes(fields["d"]), fp16_bytes(fields["m"])]
        return np.concatenate([*head, nibbles(codes[:, :16], codes[:, 16:])], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        qs = blocks[:, 4:]
        fields = {"d": fp16_from(blocks[:, :2]), "m": fp16_from(blocks[:, 2:4])}
        return np.concatenate([qs & 0x0F, qs >> 4], axis=1), fields


class Q5_1(ScaledBlockWithMin):
    """d, m (fp16), then Q5_0's fifth bits and nibbles."""

    name = "Q5_1"
    ggml_type = int(QT.Q5_1)
    file_type = int(LlamaFileType.MOSTLY_Q5_1)
    type_size = 24
    levels = tuple(range(32))

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        qh = np.packbits((codes >> 4) & 1, axis=1, bitorder="little")
        head = [fp16_bytes(fields["d"]), fp16_bytes(fields["m"]), qh]
        return np.concatenate([*head, nibbles(codes[:, :16], codes[:, 16:])], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        high = np.unpackbits(blocks[:, 4:8], axis=1, bitorder="little")
        qs = blocks[:, 8:]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        return low | (high << 4), {"d": fp16_from(blocks[:, :2]), "m": fp16_from(blocks[:, 2:4])}
