"""The SliM packed tensor format: the one definition every other piece follows.

See docs/FORMAT.md for the byte-level specification. In short: a row is a sequence
of self-describing groups of ``group_size`` columns; each group is a 4-byte header
(fp16 scale ``d`` carrying the group's width code in its sign bit and lowest
mantissa bit, fp16 offset ``m``) followed by ``group_size / 32`` chunks of
``4 * width`` bytes of bit planes. A weight dequantizes to ``f32(d) * q + f32(m)``;
the product is exact in fp32, so every implementation gets the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

GROUP_SIZES = (32, 64, 128)
AVERAGE_BITS = (2, 3, 4)
CHUNK = 32
HEADER_BYTES = 4
TYPE_ID_BASE = 1000
SCALE_VALUE_MASK = 0x7FFE
MAX_WIDTH = 5


class FormatError(ValueError):
    """Packed data that does not follow docs/FORMAT.md."""


@dataclass(frozen=True)
class SlimType:
    """One custom ggml type: an average width and a group size."""

    bits: int
    group_size: int

    @property
    def type_id(self) -> int:
        return TYPE_ID_BASE + 3 * AVERAGE_BITS.index(self.bits) + GROUP_SIZES.index(self.group_size)

    @property
    def name(self) -> str:
        return f"SLIM{self.bits}_G{self.group_size}"

    @property
    def block_bytes(self) -> int:
        """Bytes per ``group_size`` columns of a row (ggml's type_size)."""
        return HEADER_BYTES + self.group_size * self.bits // 8

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.group_size

    @property
    def widths(self) -> tuple[int, int, int]:
        """Widths for width codes 0, 1, 2."""
        return (self.bits - 1, self.bits, self.bits + 1)

    @property
    def ggml_type(self) -> int:
        return self.type_id

    def row_bytes(self, n_cols: int) -> int:
        return n_cols // self.group_size * self.block_bytes

    def dequantize(self, data: np.ndarray) -> torch.Tensor:
        """Packed rows -> float32 [..., n_cols] (storage.StoredType, as the stock types)."""
        import torch  # this module stays numpy-only for gguf-py's readers

        return torch.from_numpy(GGUFDequantizer(self).dequantize(data))

    def file_kvs(self) -> dict[str, Any]:
        return {"file_type": self.type_id, "bits": self.bits, "group_size": self.group_size, "native": None}


SLIM_TYPES = tuple(SlimType(b, g) for b in AVERAGE_BITS for g in GROUP_SIZES)
_BY_ID = {t.type_id: t for t in SLIM_TYPES}


def slim_type(bits: int, group_size: int) -> SlimType:
    if bits not in AVERAGE_BITS:
        raise FormatError(f"average bits must be one of {AVERAGE_BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise FormatError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    return SlimType(bits, group_size)


def type_from_id(type_id: int) -> SlimType | None:
    """The SliM type with this ggml id, or None for any other id."""
    return _BY_ID.get(int(type_id))


def group_bytes(width: int, group_size: int) -> int:
    return HEADER_BYTES + group_size // CHUNK * 4 * width


def group_offsets(widths: np.ndarray, group_size: int) -> np.ndarray:
    """Byte offset of each group's header inside a row (rows share one width pattern)."""
    sizes = HEADER_BYTES + group_size // CHUNK * 4 * np.asarray(widths, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def check_widths(widths: np.ndarray, stype: SlimType) -> None:
    """Widths must come from the type's three and average exactly to its bits."""
    widths = np.asarray(widths)
    allowed = np.isin(widths, stype.widths)
    if not allowed.all():
        bad = sorted(set(widths[~allowed].tolist()))
        raise FormatError(f"{stype.name} allows widths {stype.widths}, got {bad}")
    if int(widths.sum()) != stype.bits * widths.size:
        raise FormatError(
            f"{stype.name} needs an average width of exactly {stype.bits}, "
            f"got {widths.sum()}/{widths.size}"
        )


def _plane_layout(width: int) -> list[tuple[int, int]]:
    """(plane bit count, shift into q) in stored order for a width."""
    return {
        1: [(1, 0)],
        2: [(2, 0)],
        3: [(2, 0), (1, 2)],
        4: [(4, 0)],
        5: [(4, 0), (1, 4)],
    }[width]


def _pack_plane(values: np.ndarray, nbits: int) -> np.ndarray:
    """[..., 32] values < 2**nbits -> [..., 4 * nbits] bytes."""
    v = values.astype(np.uint8)
    if nbits == 4:
        return v[..., :16] | (v[..., 16:] << 4)
    if nbits == 2:
        parts = v.reshape(*v.shape[:-1], 4, 8)
        return parts[..., 0, :] | (parts[..., 1, :] << 2) | (parts[..., 2, :] << 4) | (parts[..., 3, :] << 6)
    return np.packbits(v, axis=-1, bitorder="little")


def _unpack_plane(data: np.ndarray, nbits: int) -> np.ndarray:
    """[..., 4 * nbits] bytes -> [..., 32] values."""
    if nbits == 4:
        return np.concatenate([data & 0x0F, data >> 4], axis=-1)
    if nbits == 2:
        return np.concatenate([(data >> s) & 0x03 for s in (0, 2, 4, 6)], axis=-1)
    return np.unpackbits(data, axis=-1, bitorder="little")


def encode_header(d: np.ndarray, m: np.ndarray, code: np.ndarray) -> np.ndarray:
    """fp16 d (non-negative, lowest mantissa bit clear), fp16 m, width code -> [..., 4] bytes."""
    d_bits = np.asarray(d, dtype=np.float16).view(np.uint16)
    if np.any(d_bits & ~np.uint16(SCALE_VALUE_MASK)):
        raise FormatError("scales must be non-negative fp16 with the lowest mantissa bit clear")
    code = np.asarray(code, dtype=np.uint16)
    d_bits = d_bits | ((code >> 1) << 15) | (code & 1)
    m_bits = np.asarray(m, dtype=np.float16).view(np.uint16)
    header = np.stack([d_bits, m_bits], axis=-1).astype("<u2")
    return header.view(np.uint8)


def decode_header(header: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[..., 4] bytes -> (fp16 d, fp16 m, width code)."""
    words = np.ascontiguousarray(header).view("<u2")
    d_bits, m_bits = words[..., 0], words[..., 1]
    code = ((d_bits >> 15) << 1) | (d_bits & 1)
    d = (d_bits & SCALE_VALUE_MASK).astype(np.uint16).view(np.float16)
    return d, m_bits.astype(np.uint16).view(np.float16), code.astype(np.uint8)


def pack(
    codes: np.ndarray, d: np.ndarray, m: np.ndarray, widths: np.ndarray, stype: SlimType
) -> np.ndarray:
    """Quantized tensor -> packed rows.

    codes: [rows, cols] integers with codes[:, group] < 2**widths[group];
    d, m: [rows, groups] fp16; widths: [groups], shared by all rows.
    Returns uint8 [rows, stype.row_bytes(cols)].
    """
    codes = np.asarray(codes)
    rows, cols = codes.shape
    g = stype.group_size
    if cols % g:
        raise FormatError(f"{cols} columns are not a multiple of group size {g}")
    widths = np.asarray(widths, dtype=np.int64)
    n_groups = cols // g
    if widths.shape != (n_groups,) or d.shape != (rows, n_groups) or m.shape != (rows, n_groups):
        raise FormatError("widths, d and m do not match the codes' shape and group size")
    check_widths(widths, stype)
    grouped = codes.reshape(rows, n_groups, g // CHUNK, CHUNK)
    limits = (1 << widths)[None, :, None, None]
    if np.any(grouped >= limits) or np.any(grouped < 0):
        raise FormatError("a code does not fit its group's width")
    out = np.empty((rows, stype.row_bytes(cols)), dtype=np.uint8)
    offsets = group_offsets(widths, g)
    code_of_width = {w: i for i, w in enumerate(stype.widths)}
    for width in np.unique(widths).tolist():
        sel = np.flatnonzero(widths == width)
        q = grouped[:, sel].astype(np.uint8)
        planes = [_pack_plane((q >> shift) & ((1 << nb) - 1), nb) for nb, shift in _plane_layout(width)]
        payload = np.concatenate(planes, axis=-1).reshape(rows, sel.size, -1)
        header = encode_header(d[:, sel], m[:, sel], np.full(sel.size, code_of_width[width]))
        block = np.concatenate([header, payload], axis=-1)
        index = offsets[sel][:, None] + np.arange(block.shape[-1])[None, :]
        out[:, index] = block
    return out


@dataclass
class Unpacked:
    codes: np.ndarray
    d: np.ndarray
    m: np.ndarray
    widths: np.ndarray


def read_widths(row: np.ndarray, stype: SlimType, n_cols: int) -> np.ndarray:
    """Walk one packed row's headers and return its width pattern."""
    n_groups = n_cols // stype.group_size
    widths = np.empty(n_groups, dtype=np.int64)
    pos = 0
    for i in range(n_groups):
        if pos + HEADER_BYTES > row.size:
            raise FormatError("row is shorter than its groups' widths require")
        code = int(decode_header(row[pos : pos + HEADER_BYTES])[2])
        if code > 2:
            raise FormatError(f"invalid width code {code} in group {i}")
        widths[i] = stype.widths[code]
        pos += group_bytes(widths[i], stype.group_size)
    if pos != row.size:
        raise FormatError(f"groups take {pos} bytes but the row holds {row.size}")
    return widths


def unpack(data: np.ndarray, stype: SlimType, n_cols: int) -> Unpacked:
    """Packed rows -> codes, d, m, widths; checks every row's headers."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if n_cols % stype.group_size:
        raise FormatError(f"{n_cols} columns are not a multiple of group size {stype.group_size}")
    if data.ndim != 2 or data.shape[1] != stype.row_bytes(n_cols):
        raise FormatError(
            f"{stype.name} rows of {n_cols} columns take {stype.row_bytes(n_cols)} bytes, got shape {data.shape}"
        )
    rows = data.shape[0]
    g = stype.group_size
    widths = read_widths(data[0], stype, n_cols)
    check_widths(widths, stype)
    offsets = group_offsets(widths, g)
    d, m, code = decode_header(data[:, offsets[:, None] + np.arange(HEADER_BYTES)])
    expected = np.searchsorted(stype.widths, widths)
    differ = np.argwhere(code != expected[None, :])
    if differ.size:  # first: other rows' headers were read at row 0's offsets
        row, group = differ[0].tolist()
        said = f"width code {code[row, group]}" + (", which no type has" if code[row, group] > 2 else "")
        raise FormatError(f"rows of one tensor must share one width pattern: row {row}'s group {group} has {said}, row 0's has {expected[group]}")
    if not (np.isfinite(d).all() and np.isfinite(m).all()):
        raise FormatError("a group's scale or offset is not finite")
    codes = np.empty((rows, n_cols // g, g // CHUNK, CHUNK), dtype=np.uint8)
    for width in np.unique(widths).tolist():
        sel = np.flatnonzero(widths == width)
        nbytes = group_bytes(width, g) - HEADER_BYTES
        index = offsets[sel][:, None] + HEADER_BYTES + np.arange(nbytes)[None, :]
        payload = data[:, index].reshape(rows, sel.size, g // CHUNK, 4 * width)
        q = np.zeros(payload.shape[:-1] + (CHUNK,), dtype=np.uint8)
        start = 0
        for nb, shift in _plane_layout(width):
            q |= _unpack_plane(payload[..., start : start + 4 * nb], nb) << shift
            start += 4 * nb
        codes[:, sel] = q
    return Unpacked(codes.reshape(rows, n_cols), d, m, widths)


def dequantize_codes(codes: np.ndarray, d: np.ndarray, m: np.ndarray, group_size: int) -> np.ndarray:
    """f32(d) * q + f32(m), per (row, group); the reference every kernel must match."""
    rows, cols = codes.shape
    q = codes.reshape(rows, cols // group_size, group_size).astype(np.float32)
    w = q * d.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]
    return w.reshape(rows, cols)


def dequantize(data: np.ndarray, stype: SlimType, n_cols: int) -> np.ndarray:
    """Packed rows -> float32 [rows, n_cols]."""
    u = unpack(data, stype, n_cols)
    return dequantize_codes(u.codes, u.d, u.m, stype.group_size)


def register_gguf_types() -> None:
    """Teach the ``gguf`` package our ids so GGUFReader/GGUFWriter accept them.

    GGMLQuantizationType is an IntEnum that cannot be subclassed; we add members the
    way Enum itself stores them. Idempotent; standard types are untouched.
    """
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as QT

    for t in SLIM_TYPES:
        if t.type_id not in QT._value2member_map_:
            member = int.__new__(QT, t.type_id)
            member._name_ = t.name
            member._value_ = t.type_id
            member.__objclass__ = QT
            QT._value2member_map_[t.type_id] = member
            QT._member_map_[t.name] = member
            QT._member_names_.append(t.name)
        GGML_QUANT_SIZES[QT(t.type_id)] = (t.group_size, t.block_bytes)
        try:
            from gguf import quants
        except ImportError:  # the export child's tree gguf-py may lack it: it only writes
            continue
        quants._type_traits[QT(t.type_id)] = GGUFDequantizer(t)


class GGUFDequantizer:
    """gguf-py's per-type dequantizer interface (``quants.dequantize(data, type)``) for one
    SliM type, so gguf-py, and transformers' GGUF loader through it, read SliM tensors."""

    def __init__(self, stype: SlimType):
        self.stype = stype

    def dequantize(self, data: np.ndarray) -> np.ndarray:
        """Packed rows ``[..., rows, row_bytes]`` (uint8) -> float32 ``[..., rows, n_cols]``,
        one matrix at a time: a 3-D tensor's experts may each have their own width pattern."""
        data = np.asarray(data, dtype=np.uint8)
        n_cols = data.shape[-1] // self.stype.block_bytes * self.stype.group_size
        if data.size == 0:  # no rows: nothing to decode (as gguf-py's own types answer)
            return np.zeros((*data.shape[:-1], n_cols), dtype=np.float32)
        matrices = data.reshape(-1, *data.shape[-2:]) if data.ndim > 1 else data.reshape(1, 1, -1)
        weights = np.stack([dequantize(matrix, self.stype, n_cols) for matrix in matrices])
        return weights.reshape(*data.shape[:-1], n_cols)

    def quantize(self, data: np.ndarray) -> np.ndarray:
        """gguf-py's other half: SliM codes come from the calibrated pipeline, not from gguf-py."""
        raise NotImplementedError(f"Quantization for {self.stype.name} is not in gguf-py: slim2gguf convert writes SliM types")
