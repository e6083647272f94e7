"""Fused SliM matmul ``y = x @ W^T (+ bias)`` that never materializes W.

One kernel body, two shapes of work (the ``DOT`` constexpr):

* GEMV (decode, a few tokens): one program takes ``BLOCK_N`` weight rows and every
  token; each group of weights is decoded once to fp32 and reduced against the fp32
  activations with a broadcast multiply-sum. Everything is fp32, the packed bytes are
  read once, so the kernel is bound by memory bandwidth as a GEMV should be.
* Tiled (prefill, many tokens): one program takes a ``BLOCK_M x BLOCK_N`` output tile;
  each group (a K-step of ``G`` columns) is decoded, rounded to the activations' dtype
  and fed to ``tl.dot`` with an fp32 accumulator (tensor cores for fp16/bf16).

Both walk the group table class by class (widths ``b-1``, ``b``, ``b+1``), each class
with its width as a compile-time constant, so the bit-plane decode is specialized and
there is one launch for the whole matmul. The order in which groups are summed is the
table's, not the column order: that changes only fp32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import check_device, decode_group, interpreting, round_to
from .layout import SlimTensor

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_TOKENS = 8
"""Up to this many tokens ``kernel="auto"`` uses the GEMV kernel, above it the tiled one."""
GEMV_TILE_ELEMENTS = 2048
"""Decoded weights per program and group in the GEMV kernel, times the token block."""


@triton.jit
def _accumulate_class(
    acc, x_ptr, stride_xm, tokens, token_mask, w_ptr, row_base, row_mask,
    group_index_ptr, group_word_ptr, start, stop,
    WIDTH: tl.constexpr, G: tl.constexpr, DOT: tl.constexpr, DOT_FP32: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """Add the contribution of table entries [start, stop) (all of width WIDTH)."""
    k = tl.arange(0, G)
    for i in range(start, stop):
        group = tl.load(group_index_ptr + i)
        w = decode_group(w_ptr, row_base, row_mask, tl.load(group_word_ptr + i), WIDTH, G)
        x_ptrs = x_ptr + tokens.to(tl.int64)[:, None] * stride_xm + (group * G + k)[None, :]
        x = tl.load(x_ptrs, mask=token_mask[:, None], other=0.0)
        if DOT:
            # W is rounded to the activations' dtype: the one rounding the error bound counts.
            w = round_to(w, x_ptr.dtype.element_ty, SOFT_BF16)
            if DOT_FP32:
                # fp32 operands: exact IEEE products instead of TF32 (and the interpreter's
                # bf16 dot, which multiplies raw bits); bf16 values widen exactly.
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, group_index_ptr, group_word_ptr, bias_ptr, y_ptr,
    M, N, row_words, stride_xm, stride_ym, n_lo, n_mid, n_hi,
    B: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, DOT_FP32: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """Axis 0 walks BLOCK_N weight rows, axis 1 BLOCK_M tokens."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    token_mask = tokens < M
    row_base = rows.to(tl.int64) * row_words
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate_class(acc, x_ptr, stride_xm, tokens, token_mask, w_ptr, row_base, row_mask,
                            group_index_ptr, group_word_ptr, 0, n_lo, B - 1, G, DOT, DOT_FP32, SOFT_BF16)
    acc = _accumulate_class(acc, x_ptr, stride_xm, tokens, token_mask, w_ptr, row_base, row_mask,
                            group_index_ptr, group_word_ptr, n_lo, n_lo + n_mid, B, G, DOT, DOT_FP32, SOFT_BF16)
    acc = _accumulate_class(acc, x_ptr, stride_xm, tokens, token_mask, w_ptr, row_base, row_mask,
                            group_index_ptr, group_word_ptr, n_lo + n_mid, n_lo + n_mid + n_hi, B + 1, G,
                            DOT, DOT_FP32, SOFT_BF16)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + tokens.to(tl.int64)[:, None] * stride_ym + rows[None, :]
    tl.store(y_ptrs, round_to(acc, y_ptr.dtype.element_ty, SOFT_BF16), mask=token_mask[:, None] & row_mask[None, :])


def _gemv_blocks(tokens: int, group_size: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): all tokens in one block, rows so the decoded tile stays small."""
    block_m = triton.next_power_of_2(tokens)
    return block_m, max(1, GEMV_TILE_ELEMENTS // (group_size * block_m))


def slim_matmul(
    x: torch.Tensor,
    t: SlimTensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    kernel: str = "auto",
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``x [M, in_features] @ W^T (+ bias)`` -> ``[M, out_features]`` in x's dtype.

    ``kernel`` is "gemv", "tiled" or "auto" (GEMV up to GEMV_MAX_TOKENS tokens). Block
    sizes and warps default to untuned heuristics; the benchmark overrides them.
    """
    if x.dim() != 2 or x.shape[1] != t.in_features or x.dtype not in INPUT_DTYPES:
        raise ValueError(f"x must be [M, {t.in_features}] of one of {INPUT_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m_tokens, n_rows = x.shape[0], t.out_features
    if out is None:
        out = torch.empty((m_tokens, n_rows), dtype=x.dtype, device=x.device)
    if out.dtype != x.dtype or tuple(out.shape) != (m_tokens, n_rows) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous [{m_tokens}, {n_rows}] {x.dtype} tensor")
    if bias is not None and tuple(bias.shape) != (n_rows,):
        raise ValueError(f"bias must have shape ({n_rows},), got {tuple(bias.shape)}")
    check_device(x, t.packed, t.group_index, out, *([] if bias is None else [bias]))
    if m_tokens == 0:
        return out
    if kernel == "auto":
        kernel = "gemv" if m_tokens <= GEMV_MAX_TOKENS else "tiled"
    if kernel == "gemv":
        default_m, default_n = _gemv_blocks(m_tokens, t.stype.group_size)
        block_m, block_n = block_m or default_m, block_n or default_n
        if block_m < m_tokens:
            raise ValueError(f"the GEMV kernel takes all {m_tokens} tokens in one block, got block_m={block_m}")
    elif kernel == "tiled":
        # tl.dot needs at least 16 rows and columns.
        block_m = block_m or (128 if m_tokens > 64 else 64 if m_tokens > 16 else 16)
        block_n = block_n or 64
    else:
        raise ValueError(f"kernel must be 'auto', 'gemv' or 'tiled', got {kernel!r}")
    dot = kernel == "tiled"
    words = t.words
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(m_tokens, block_m))
    _matmul_kernel[grid](
        x, words, t.group_index, t.group_word, out if bias is None else bias, out,
        m_tokens, n_rows, words.shape[1], x.stride(0), out.stride(0), *t.counts,
        B=t.stype.bits, G=t.stype.group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_BIAS=bias is not None, DOT=dot,
        DOT_FP32=dot and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting())),
        SOFT_BF16=interpreting(),
        num_warps=num_warps or 4,
    )
    return out
