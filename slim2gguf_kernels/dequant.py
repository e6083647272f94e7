"""Dequantize a packed SliM tensor on the device (fp32 output equals format.dequantize)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import check_device, decode_group, interpreting, round_to
from .layout import SlimTensor

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dequant_kernel(
    w_ptr, group_index_ptr, group_word_ptr, out_ptr,
    N, row_words, stride_out, first,
    WIDTH: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """One program: BLOCK_R rows of one group; axis 1 walks one width class."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    i = first + tl.program_id(1)
    group = tl.load(group_index_ptr + i)
    w = decode_group(w_ptr, rows.to(tl.int64) * row_words, row_mask, tl.load(group_word_ptr + i), WIDTH, G)
    cols = group * G + tl.arange(0, G)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(ptrs, round_to(w, out_ptr.dtype.element_ty, SOFT_BF16), mask=row_mask[:, None])


def dequantize(
    t: SlimTensor,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    block_rows: int = 16,
) -> torch.Tensor:
    """Weights [out_features, in_features]; fp16/bf16 are the fp32 values rounded once.

    One launch per width class, so the width is a compile-time constant in each.
    """
    shape = (t.out_features, t.in_features)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=t.packed.device)
    if out.dtype not in OUTPUT_DTYPES or tuple(out.shape) != shape or out.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous {shape} tensor of one of {OUTPUT_DTYPES}")
    check_device(t.packed, t.group_index, out)
    words = t.words
    first = 0
    for width, count in zip(t.stype.widths, t.counts):
        if count:
            grid = (triton.cdiv(t.out_features, block_rows), count)
            _dequant_kernel[grid](
                words, t.group_index, t.group_word, out,
                t.out_features, words.shape[1], out.stride(0), first,
                WIDTH=width, G=t.stype.group_size, BLOCK_R=block_rows, SOFT_BF16=interpreting(),
            )
        first += count
    return out
