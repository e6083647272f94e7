"""ggml's non-linear 4-bit types: IQ4_NL (one fp16 scale per 32 weights) and IQ4_XS
(6-bit sub-scales per 32 under one fp16 scale per 256). A weight is ``scale * KVALUES[code]``."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from .base import fp16_bytes, fp16_from, nibbles
from .kquants import Signed
from .legacy import Q4_0, ScaledBlock

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class IQ4_NL(ScaledBlock):
    """Q4_0's layout with ggml's non-linear level table."""

    name = "IQ4_NL"
    ggml_type = int(QT.IQ4_NL)
    file_type = int(LlamaFileType.MOSTLY_IQ4_NL)
    type_size = 18
    levels = KVALUES
    encode = Q4_0.encode
    decode = Q4_0.decode


class IQ4_XS(Signed):
    """d (fp16), the high 2 bits of the eight 6-bit sub-scales (u16), their low nibbles
    (4 bytes), then per sub-block 16 bytes: low nibbles weights 0-15, high 16-31.
    A sub-block's scale is d * (stored - 32)."""

    name = "IQ4_XS"
    ggml_type = int(QT.IQ4_XS)
    file_type = int(LlamaFileType.MOSTLY_IQ4_XS)
    type_size = 136
    sub_size = 32
    levels = KVALUES
    scale_range = (-32, 31)

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        n = codes.shape[0]
        ls = (fields["sc"].astype(np.int16) + 32).astype(np.uint16)
        scales_h = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
        scales_l = nibbles(ls[:, 0::2], ls[:, 1::2]).astype(np.uint8)
        q = codes.reshape(n, 8, 2, 16)
        qs = nibbles(q[:, :, 0], q[:, :, 1]).reshape(n, 128)
        h = np.ascontiguousarray(scales_h, dtype="<u2").view(np.uint8).reshape(n, 2)
        return np.concatenate([fp16_bytes(fields["d"]), h, scales_l, qs], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = blocks.shape[0]
        scales_h = np.ascontiguousarray(blocks[:, 2:4]).view("<u2").reshape(n, 1)
        high = (scales_h >> (2 * np.arange(8, dtype=np.uint16))) & 3
        low = np.stack([blocks[:, 4:8] & 0x0F, blocks[:, 4:8] >> 4], axis=2).reshape(n, 8)
        sc = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 32
        qs = blocks[:, 8:].reshape(n, 8, 16)
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 256)
        return codes, {"d": fp16_from(blocks[:, :2]), "sc": sc.astype(np.int8)}
