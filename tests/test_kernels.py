"""Triton kernels against the Python reference (docs/FORMAT.md, slim2gguf/format.py).

Runs natively on a CUDA GPU; without one, through Triton's CPU interpreter, which must
be switched on before the kernels are first decorated (hence before the import below).

Error bound for ``y = x @ W^T (+ bias)`` against float64 ``x @ W^T`` with the exact
stored W (fp32 values from ``format.dequantize``), elementwise, with
``S = |x| @ |W|^T + |bias|`` and ``K`` the inner dimension:

* Weight rounding (tiled kernel only): W is rounded to the activations' dtype before
  ``tl.dot``: relative error ``u_w`` (fp16 2^-11, bf16 2^-8, fp32 0) plus, for fp16,
  up to 2^-25 absolute per weight in the subnormal range, i.e. ``2^-25 * sum|x|``.
  x itself is an input and exact. For fp16 inputs this term dominates: ~2^-11 S.
* Accumulation in fp32: at most K products (exact for fp16/bf16 operands) and K
  additions (bias included), each off by at most one unit 2^-23 of the running
  magnitude (2^-24 for round-to-nearest, doubled for tensor cores that truncate while
  aligning addends): ``(K + 1) * 2^-23 * S`` (the usual worst case gamma_K; random
  errors grow like sqrt(K), so the observed error sits far below).
* Output rounding to x's dtype: ``u_out * (|y| + e)`` plus the subnormal half-ulp.

The bound is rigorous, yet tight enough that one wrongly decoded bit exceeds it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from torch import nn  # noqa: E402

from slim2gguf import format as F  # noqa: E402
from slim2gguf.triton_linear import SlimLinear, swap_linears  # noqa: E402
from slim2gguf_kernels import GEMV_MAX_TOKENS, SlimTensor, dequantize, slim_matmul  # noqa: E402
from slim2gguf_kernels.decode import interpreting  # noqa: E402
from slim2gguf_kernels.synthetic import balanced_widths, random_packed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    raise RuntimeError(
        "slim2gguf_kernels was imported before TRITON_INTERPRET=1 was set; "
        "set it in the environment to run these tests without CUDA"
    )

ROWS = 37  # not a multiple of any block size
N_GROUPS = 4
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
SUBNORMAL_HALF_ULP = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float32: 2.0**-150}
ACCUMULATION_UNIT = 2.0**-23
TYPES = pytest.mark.parametrize("stype", F.SLIM_TYPES, ids=lambda t: t.name)
DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)


def make_weight(stype: F.SlimType, seed: int, raised: int | None = None) -> tuple[np.ndarray, int]:
    """Packed [ROWS, row_bytes] and its column count; ``raised`` groups at b+1 (and b-1),
    by default at least one of each so widths b-1 and b+1 (1 to 5 bits) all occur."""
    rng = np.random.default_rng(seed)
    cols = N_GROUPS * stype.group_size
    if raised is None:
        raised = int(rng.integers(1, N_GROUPS // 2 + 1))
    widths = balanced_widths(N_GROUPS, stype, rng, raised)
    return random_packed(ROWS, cols, stype, rng, widths), cols


def error_bound(x: torch.Tensor, w: np.ndarray, bias: torch.Tensor | None, tiled: bool) -> torch.Tensor:
    """Elementwise bound on |kernel - exact| derived in the module docstring."""
    x64 = x.double().cpu()
    w64 = torch.from_numpy(w).double()
    s = x64.abs() @ w64.abs().T
    y = x64 @ w64.T
    if bias is not None:
        s += bias.double().cpu().abs()
        y += bias.double().cpu()
    rounds_w = tiled and x.dtype != torch.float32
    e = ((UNIT[x.dtype] if rounds_w else 0.0) + (w.shape[1] + 1) * ACCUMULATION_UNIT) * s
    if rounds_w:
        e += SUBNORMAL_HALF_ULP[x.dtype] * x64.abs().sum(1, keepdim=True)
    return e + UNIT[x.dtype] * (y.abs() + e) + SUBNORMAL_HALF_ULP[x.dtype]


def check_matmul(y: torch.Tensor, x: torch.Tensor, w: np.ndarray, bias: torch.Tensor | None, tiled: bool) -> None:
    exact = x.double().cpu() @ torch.from_numpy(w).double().T
    if bias is not None:
        exact += bias.double().cpu()
    err = (y.double().cpu() - exact).abs()
    bound = error_bound(x, w, bias, tiled)
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) outputs"
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g} x the bound"


@TYPES
@pytest.mark.parametrize("raised", [None, 0], ids=["mixed", "uniform"])
def test_dequantize_fp32_is_bit_exact(stype: F.SlimType, raised: int | None) -> None:
    data, cols = make_weight(stype, seed=stype.type_id, raised=raised)
    ref = F.dequantize(data, stype, cols)
    out = torch.full((ROWS, cols), float("nan"), device=DEVICE)
    dequantize(SlimTensor.from_packed(data, stype, cols, device=DEVICE), out=out)
    assert np.array_equal(out.cpu().numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dequantize_half_rounds_the_fp32_values_once(dtype: torch.dtype) -> None:
    stype = F.slim_type(3, 64)
    data, cols = make_weight(stype, seed=7)
    out = torch.full((ROWS, cols), float("nan"), dtype=dtype, device=DEVICE)
    dequantize(SlimTensor.from_packed(data, stype, cols, device=DEVICE), out=out)
    assert torch.equal(out.cpu(), torch.from_numpy(F.dequantize(data, stype, cols)).to(dtype))


@TYPES
@DTYPES
@pytest.mark.parametrize("kernel,tokens", [("gemv", 1), ("gemv", 5), ("tiled", 19)])
def test_matmul_within_error_bound(stype: F.SlimType, dtype: torch.dtype, kernel: str, tokens: int) -> None:
    data, cols = make_weight(stype, seed=1000 * stype.type_id + tokens)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cols, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(ROWS, generator=gen).to(dtype).to(DEVICE) if stype.group_size == 64 else None
    y = torch.full((tokens, ROWS), float("nan"), dtype=dtype, device=DEVICE)
    blocks = {"block_m": 16, "block_n": 32} if kernel == "tiled" else {"block_n": 16} if tokens > 1 else {}
    slim_matmul(x, SlimTensor.from_packed(data, stype, cols, device=DEVICE), bias, out=y, kernel=kernel, **blocks)
    check_matmul(y, x, F.dequantize(data, stype, cols), bias, tiled=kernel == "tiled")


@pytest.mark.parametrize("tokens", [GEMV_MAX_TOKENS, GEMV_MAX_TOKENS + 1, 70])
def test_auto_kernel_and_default_blocks(tokens: int) -> None:
    stype = F.slim_type(2, 128)
    data, cols = make_weight(stype, seed=tokens)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(0)).half().to(DEVICE)
    y = slim_matmul(x, SlimTensor.from_packed(data, stype, cols, device=DEVICE))
    check_matmul(y, x, F.dequantize(data, stype, cols), None, tiled=tokens > GEMV_MAX_TOKENS)


def test_slim_linear_and_swap_linears() -> None:
    stype = F.slim_type(4, 32)
    data, cols = make_weight(stype, seed=3)
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Linear(cols, ROWS, bias=True)))
    model = model.to(DEVICE)
    bias = model[1][0].bias.detach().clone()
    swap_linears(model, {"1.0": (data, stype)})
    layer = model[1][0]
    assert isinstance(layer, SlimLinear) and layer.packed.device.type == torch.device(DEVICE).type
    x = torch.randn(2, 3, cols, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = model(x)
    assert y.shape == (2, 3, ROWS)
    check_matmul(y.reshape(-1, ROWS), x.reshape(-1, cols), F.dequantize(data, stype, cols), bias, tiled=False)


def test_swap_linears_checks_every_entry_first() -> None:
    stype = F.slim_type(2, 32)
    data, cols = make_weight(stype, seed=4)
    model = nn.Sequential(nn.Linear(cols, ROWS), nn.Linear(cols, ROWS + 1))
    with pytest.raises(ValueError, match="rows"):
        swap_linears(model, {"0": (data, stype), "1": (data, stype)})
    assert all(isinstance(m, nn.Linear) for m in model)


def test_from_packed_aligns_torch_input_and_rejects_bad_rows() -> None:
    stype = F.slim_type(3, 32)
    data, cols = make_weight(stype, seed=5)
    flat = torch.zeros(data.size + 1, dtype=torch.uint8)
    flat[1:] = torch.from_numpy(data).reshape(-1)
    shifted = flat[1:].view(data.shape)  # storage offset 1: not word aligned
    t = SlimTensor.from_packed(shifted, stype, cols, device=DEVICE)
    out = dequantize(t)
    assert np.array_equal(out.cpu().numpy(), F.dequantize(data, stype, cols))

    bad = data.copy()
    offsets = F.group_offsets(F.read_widths(data[0], stype, cols), stype.group_size)
    bad[1, offsets[0] + 1] ^= 0x80  # flip row 1's width code in its first group
    with pytest.raises(F.FormatError, match="share one width pattern"):
        SlimTensor.from_packed(bad, stype, cols)
    with pytest.raises(F.FormatError):
        SlimTensor.from_packed(data[:, :-4], stype, cols)
