"""Triton device functions that turn one packed group of many rows into weights.

Shared by the dequantize and matmul kernels, so there is exactly one reading of
docs/FORMAT.md on the GPU side. Rows are read as int32 words (see layout.py): a
chunk of 32 weights of width ``k`` is ``k`` words, its planes in stored order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _plane(row_ptrs, chunk_word, e, row_mask, NBITS: tl.constexpr, PLANE_WORD: tl.constexpr):
    """Bits of one plane (P4, P2 or P1) for elements ``e`` (0..31) of their chunks.

    Byte ``i`` of a plane sits at bits ``8 * (i % 4)`` of word ``i // 4``:
    P4 byte ``e % 16`` holds ``e`` in nibble ``e // 16``; P2 byte ``e % 8`` holds it in
    bits ``2 * (e // 8)``; P1 is one 32-bit mask with ``e`` at bit ``e``.
    """
    if NBITS == 4:
        word = (e % 16) // 4
        shift = (e % 4) * 8 + (e // 16) * 4
    elif NBITS == 2:
        word = (e % 8) // 4
        shift = (e % 4) * 8 + (e // 8) * 2
    else:
        word = e * 0
        shift = e
    v = tl.load(row_ptrs + (chunk_word + PLANE_WORD + word)[None, :], mask=row_mask[:, None], other=0)
    # int32 shifts are arithmetic; the mask keeps only the plane's bits.
    return (v >> shift[None, :]) & ((1 << NBITS) - 1)


@triton.jit
def decode_group(w_ptr, row_base, row_mask, group_word, WIDTH: tl.constexpr, G: tl.constexpr):
    """fp32 weights [rows, G] of one group of width WIDTH starting at ``group_word``.

    ``row_base`` holds each row's first word (int64); masked rows decode to 0.
    ``d * q + m`` is exact up to one rounding, so this equals ``format.dequantize``.
    """
    row_ptrs = w_ptr + row_base[:, None]
    k = tl.arange(0, G)
    e = k % 32
    chunk_word = group_word + 1 + (k // 32) * WIDTH
    head = tl.load(w_ptr + row_base + group_word, mask=row_mask, other=0)
    d = (head & 0x7FFE).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    m = ((head >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    if WIDTH >= 4:
        q = _plane(row_ptrs, chunk_word, e, row_mask, 4, 0)
    elif WIDTH >= 2:
        q = _plane(row_ptrs, chunk_word, e, row_mask, 2, 0)
    else:
        q = _plane(row_ptrs, chunk_word, e, row_mask, 1, 0)
    if WIDTH == 3:
        q = q | (_plane(row_ptrs, chunk_word, e, row_mask, 1, 2) << 2)
    if WIDTH == 5:
        q = q | (_plane(row_ptrs, chunk_word, e, row_mask, 1, 4) << 4)
    return d[:, None] * q.to(tl.float32) + m[:, None]


@triton.jit
def round_to(v, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even.

    SOFT_BF16 does the bf16 rounding in integer arithmetic: Triton's interpreter
    truncates fp32 -> bf16, where a GPU (and PyTorch) round to nearest even.
    """
    if SOFT_BF16 and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(DTYPE)


def interpreting() -> bool:
    """Whether this module's kernels were built for Triton's CPU interpreter.

    TRITON_INTERPRET is read when a kernel is decorated, so what counts is its value
    when this package was first imported.
    """
    return isinstance(decode_group, InterpretedFunction)


def check_device(*tensors: torch.Tensor) -> None:
    """Fail clearly instead of deep inside Triton when tensors cannot be run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"tensors are on different devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the SliM Triton kernels need CUDA tensors (got {device}); for CPU tensors set "
            "TRITON_INTERPRET=1 before slim2gguf_kernels is first imported"
        )
