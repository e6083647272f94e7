"""ggml's K-quants: 256-wide super-blocks whose 16- or 32-wide sub-blocks carry 4-8-bit
scales (and, for Q2_K, Q4_K and Q5_K, mins) under fp16 super-scales.

Q2_K, Q4_K, Q5_K: a weight is ``d*sc * code - dmin*m`` (codes 0..2^b-1, sc and m unsigned).
Q3_K, Q6_K: a weight is ``d*sc * (code - 2^(b-1))`` (sc signed).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from .base import BlockParams, Fields, NativeType, fp16_bytes, fp16_from, nibbles
from .fitting import fit_affine, fit_symmetric, quantize_scales, weights_of


class WithMins(NativeType):
    """Unsigned sub-scales and mins under fp16 ``d`` and ``dmin``."""

    block_size = 256
    scale_range: tuple[int, int]  # of the sub-scales, and of the mins
    has_offset = True
    free_fields = ("d", "dmin")

    def _fit_rows(self, w: torch.Tensor, importance: torch.Tensor) -> BlockParams:
        x = w.float().view(w.shape[0], self.n_sub, self.sub_size)
        scale, offset = fit_affine(x, weights_of(importance, (self.n_sub, self.sub_size)), len(self.levels) - 1)
        d, sc = quantize_scales(scale, *self.scale_range)
        dmin, m = quantize_scales(-offset, *self.scale_range)
        return self.params({"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": m.to(torch.uint8)})

    def sub_scales(self, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        scale = fields["d"].float()[:, None] * fields["sc"].float()
        return scale, -(fields["dmin"].float()[:, None] * fields["m"].float())


class Signed(NativeType):
    """Signed sub-scales under one fp16 ``d``; levels centred on 0."""

    block_size = 256
    scale_range: tuple[int, int]

    def _fit_rows(self, w: torch.Tensor, importance: torch.Tensor) -> BlockParams:
        x = w.float().view(w.shape[0], self.n_sub, self.sub_size)
        s = fit_symmetric(x, weights_of(importance, (self.n_sub, self.sub_size)), self._levels, self.nearest)
        d, sc = quantize_scales(s, *self.scale_range)
        return self.params({"d": d, "sc": sc.to(torch.int8)})

    def sub_scales(self, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        scale = fields["d"].float()[:, None] * fields["sc"].float()
        return scale, torch.zeros_like(scale)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> Q4_K/Q5_K's 12 bytes: bytes 0-3 scales 0-3 (+ top 2
    bits of scales 4-7), 4-7 mins 0-3 (+ top bits of mins 4-7), 8-11 low nibbles of scales
    and mins 4-7."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    first = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    second = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    return np.concatenate([first, second, nibbles(sc[:, 4:], m[:, 4:])], axis=1)


def _unpack_k4_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, m


def _k4_head(fields: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Q4_K's and Q5_K's first 16 bytes: d, dmin, the packed scales and mins."""
    return [fp16_bytes(fields["d"]), fp16_bytes(fields["dmin"]), _pack_k4_scales(fields["sc"], fields["m"])]


def _k4_fields(blocks: np.ndarray) -> dict[str, np.ndarray]:
    sc, m = _unpack_k4_scales(blocks[:, 4:16])
    return {"d": fp16_from(blocks[:, 0:2]), "dmin": fp16_from(blocks[:, 2:4]), "sc": sc, "m": m}


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """Codes [N, 256] < 4 -> 64 bytes: weight 128h + 32s + b at byte 32h + b, bits 2s."""
    v = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    v = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return (v & 3).reshape(-1, 256)


def _pack_bit_planes(bits: np.ndarray) -> np.ndarray:
    """Bits [N, 256] -> 32 bytes: weight 32k + b at byte b, bit k."""
    v = bits.reshape(-1, 8, 32).astype(np.uint8)
    return (v << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)


def _unpack_bit_planes(data: np.ndarray) -> np.ndarray:
    return ((data[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(-1, 256)


def _pack_nibbles_k(q: np.ndarray) -> np.ndarray:
    """Codes [N, 256] < 16 -> 128 bytes: per 64 weights, 32 bytes of low nibbles (first 32) and high."""
    v = q.reshape(-1, 4, 2, 32)
    return nibbles(v[:, :, 0], v[:, :, 1]).reshape(-1, 128)


def _unpack_nibbles_k(qs: np.ndarray) -> np.ndarray:
    v = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([v & 0x0F, v >> 4], axis=2).reshape(-1, 256)


class Q2_K(WithMins):
    """16 bytes of (4-bit scale | 4-bit min << 4) per 16 weights, 64 bytes of 2-bit codes, d, dmin."""

    name = "Q2_K"
    ggml_type = int(QT.Q2_K)
    file_type = int(LlamaFileType.MOSTLY_Q2_K)
    type_size = 84
    sub_size = 16
    levels = tuple(range(4))
    scale_range = (0, 15)

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        scales = nibbles(fields["sc"].astype(np.uint8), fields["m"].astype(np.uint8))
        return np.concatenate([scales, _pack_2bit(codes), fp16_bytes(fields["d"]), fp16_bytes(fields["dmin"])], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        scales = blocks[:, :16]
        fields = {"d": fp16_from(blocks[:, 80:82]), "dmin": fp16_from(blocks[:, 82:84]), "sc": scales & 0x0F, "m": scales >> 4}
        return _unpack_2bit(blocks[:, 16:80]), fields


class Q4_K(WithMins):
    """d, dmin, 12 bytes of 6-bit scales and mins per 32 weights, 128 bytes of nibbles."""

    name = "Q4_K"
    ggml_type = int(QT.Q4_K)
    file_type = int(LlamaFileType.MOSTLY_Q4_K_S)
    type_size = 144
    sub_size = 32
    levels = tuple(range(16))
    scale_range = (0, 63)

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([*_k4_head(fields), _pack_nibbles_k(codes)], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return _unpack_nibbles_k(blocks[:, 16:]), _k4_fields(blocks)


class Q5_K(WithMins):
    """Q4_K's header, 32 bytes holding each weight's fifth bit (weight 32k + b at byte b,
    bit k), then Q4_K's nibbles."""

    name = "Q5_K"
    ggml_type = int(QT.Q5_K)
    file_type = int(LlamaFileType.MOSTLY_Q5_K_S)
    type_size = 176
    sub_size = 32
    levels = tuple(range(32))
    scale_range = (0, 63)

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([*_k4_head(fields), _pack_bit_planes(codes >> 4), _pack_nibbles_k(codes & 0x0F)], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        codes = _unpack_nibbles_k(blocks[:, 48:]) | (_unpack_bit_planes(blocks[:, 16:48]) << 4)
        return codes, _k4_fields(blocks)


class Q3_K(Signed):
    """32 bytes of third bits (weight 32k + b at byte b, bit k; set: code ≥ 4), 64 bytes of
    2-bit low parts, 12 bytes of sixteen 6-bit scales (stored + 32), d."""

    name = "Q3_K"
    ggml_type = int(QT.Q3_K)
    file_type = int(LlamaFileType.MOSTLY_Q3_K_S)
    type_size = 110
    sub_size = 16
    levels = tuple(range(-4, 4))
    scale_range = (-32, 31)

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        s6 = (fields["sc"].astype(np.int16) + 32).astype(np.uint8)
        low = nibbles(s6[:, :8], s6[:, 8:])
        top = (s6 >> 4).reshape(-1, 4, 4)  # [N, s, b]: scale 4s + b goes to byte 8 + b, bits 2s
        high = (top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)).astype(np.uint8)
        parts = [_pack_bit_planes(codes >> 2), _pack_2bit(codes & 3), low, high, fp16_bytes(fields["d"])]
        return np.concatenate(parts, axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        codes = _unpack_2bit(blocks[:, 32:96]) | (_unpack_bit_planes(blocks[:, :32]) << 2)
        scales = blocks[:, 96:108]
        low = np.concatenate([scales[:, :8] & 0x0F, scales[:, :8] >> 4], axis=1)
        high = ((scales[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3).reshape(-1, 16)
        sc = (low | (high << 4)).astype(np.int16) - 32
        return codes, {"d": fp16_from(blocks[:, 108:110]), "sc": sc.astype(np.int8)}


class Q6_K(Signed):
    """128 bytes of low nibbles (weight 128h + 64s + b at byte 64h + b, nibble s), 64 bytes
    of high 2 bits (weight 128h + 32t + b at byte 32h + b, bits 2t), sixteen int8 scales, d."""

    name = "Q6_K"
    ggml_type = int(QT.Q6_K)
    file_type = int(LlamaFileType.MOSTLY_Q6_K)
    type_size = 210
    sub_size = 16
    levels = tuple(range(-32, 32))
    scale_range = (-128, 127)

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        low = (codes & 0x0F).reshape(-1, 2, 2, 64)
        ql = nibbles(low[:, :, 0], low[:, :, 1]).reshape(-1, 128)
        top = (codes >> 4).reshape(-1, 2, 4, 32).astype(np.uint8)
        qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(-1, 64)
        scales = fields["sc"].astype(np.int8).view(np.uint8)
        return np.concatenate([ql, qh, scales, fp16_bytes(fields["d"])], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ql = blocks[:, :128].reshape(-1, 2, 1, 64)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 256)
        qh = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
        codes = low | ((qh & 3).reshape(-1, 256) << 4)
        return codes, {"d": fp16_from(blocks[:, 208:210]), "sc": blocks[:, 192:208].view(np.int8).copy()}
