"""The patched llama.cpp's SliM kernels against slim2gguf.format, through llama-slim-dump.

For every type, a synthetic GGUF (random codes, scales and offsets; balanced random width
patterns using all three widths; odd row counts; one tensor whose rows alternate between two
width patterns, which the format allows and the kernels' shared-width fast path must notice)
is read back by ggml:

* dequantization (the type's to_float trait, and GET_ROWS on the CPU backend) must equal
  ``format.dequantize`` bit for bit;
* MUL_MAT on the CPU backend (vec_dot against Q8_1 activations) must match float64
  references: see ``_check_mul_mat`` for the two tolerances. It runs twice: with the tensor
  in a plain CPU buffer, and in the CPU_REPACK buffer where llama.cpp keeps weights by
  default, whose AVX2 builds interleave SliM tensors by 8 rows at load time (tensors whose
  rows differ in width within 8 rows are kept as they are, and other row counts refused);
* corrupted data (bad width code, non-finite scale, widths that overrun the row) must be
  rejected by ``ggml_validate_row_data`` with a clear message, without a crash;
* ops that would read inside a row (column views, CPY/DUP, reshapes that cut rows) must be
  refused by the CPU backend's supports_op;
* ggml's own test-quantize-fns must pass for the types (through the patch's reference
  round-to-nearest quantizer);
* IQ4_XS, Q3_K, Q2_K, Q4_K, IQ4_NL, IQ3_S and IQ3_XXS (llama.cpp's own types, which native output writes),
  which the patch interleaves by 8 rows in CPU_REPACK as it does the SliM types, must multiply as
  llama.cpp's own kernels for them do in a plain buffer: the 8-row tiles below 8 columns, and
  from 8 columns on both the tiles and llama.cpp's tiled kernel on the rows put back into
  plain blocks (IQ4_NL, which that kernel does not take, and IQ3_S and IQ3_XXS, held as 4-bit codes
  that are not put back, on the tiles); MUL_MAT_ID must route 8-row experts of all seven.

The kernels run in three builds: "native" (all of this CPU's SIMD: AVX2, plus AVX512-VNNI
where present), "sanitize" (plain AVX2, with AddressSanitizer and UBSan: a read past a row
or undefined behaviour fails the test) and "generic" (no SIMD: the scalar kernels).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from build_variants import sanitizer_env, sanitizer_report, skip_reason, x86_flags

from slim2gguf import format as fmt
from slim2gguf import llamacpp

pytestmark = pytest.mark.e2e

# SLIM2GGUF_KERNEL_TEST_VARIANTS=native skips the two extra (ggml-only) builds
VARIANTS = tuple(os.environ.get("SLIM2GGUF_KERNEL_TEST_VARIANTS", "native,sanitize,generic").split(","))
# tag -> (rows, groups, rows per width pattern: 0 one pattern, 1 rows alternate between two,
# 8 each block of 8 rows its own, as a stack of 8-row experts): odd row counts; 6 groups hold
# all three widths, 2 groups only b-1 and b+1; "x8" tensors have whole blocks of 8 rows
SHAPES = {"a": (7, 6, 0), "b": (3, 2, 0), "mixed": (9, 6, 1), "x8": (16, 6, 0), "x8mixed": (8, 6, 1), "x8experts": (24, 6, 8)}
BATCHES = (1, 7)  # activation columns: 1 for token generation; 7 = tiles of 4, 2 and 1 columns
THREADS = 2


def _interleaves(variant: str) -> bool:
    """Whether the build interleaves SliM tensors in CPU_REPACK (its AVX2/F16C/FMA kernels)."""
    return variant != "generic" and {"avx2", "fma", "f16c"} <= x86_flags()


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request) -> str:
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def dump_tool(variant) -> Path:
    return llamacpp.binary(llamacpp.DUMP_TOOL, cpu=variant)


# --- synthetic tensors ---------------------------------------------------------------------


def _random_widths(b: int, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """A balanced width pattern; all three widths when n_groups >= 3."""
    n_changed = int(rng.integers(1, n_groups // 2 + 1))
    widths = np.array([b - 1] * n_changed + [b + 1] * n_changed + [b] * (n_groups - 2 * n_changed))
    rng.shuffle(widths)
    return widths


def _random_tensor(stype: fmt.SlimType, rows: int, n_groups: int, rng: np.random.Generator, period: int = 0) -> np.ndarray:
    """Packed rows; with ``period`` 1, odd rows get a second width pattern; with 8, each block
    of 8 rows its own (fmt.unpack rejects such tensors, so references are made row by row)."""
    if period:
        patterns = [_random_widths(stype.bits, n_groups, rng) for _ in range(2 if period == 1 else rows // period)]
        for i in range(1, len(patterns)):
            while np.array_equal(patterns[i], patterns[i - 1]):
                patterns[i] = _random_widths(stype.bits, n_groups, rng)
        pick = (lambda r: r % 2) if period == 1 else (lambda r: r // period)
        parts = [_random_tensor_rows(stype, 1, patterns[pick(r)], rng, constant_group=r == 0) for r in range(rows)]
        return np.concatenate(parts)
    return _random_tensor_rows(stype, rows, _random_widths(stype.bits, n_groups, rng), rng)


def _random_tensor_rows(
    stype: fmt.SlimType, rows: int, widths: np.ndarray, rng: np.random.Generator, constant_group: bool = True
) -> np.ndarray:
    g, n_groups = stype.group_size, len(widths)
    codes = np.concatenate([rng.integers(0, 1 << int(w), size=(rows, g)) for w in widths], axis=1)
    d = rng.uniform(1e-3, 0.25, size=(rows, n_groups)).astype(np.float16)
    d = (d.view(np.uint16) & np.uint16(fmt.SCALE_VALUE_MASK)).view(np.float16)
    m = rng.uniform(-1.0, 1.0, size=(rows, n_groups)).astype(np.float16)
    if constant_group:
        d[0, 0] = 0.0
    return fmt.pack(codes, d, m, widths, stype)


def _write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, fmt.SlimType]]) -> None:
    import gguf

    fmt.register_gguf_types()
    writer = gguf.GGUFWriter(str(path), "slimtest")
    for name, (packed, stype) in tensors.items():
        writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType(stype.type_id))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, fmt.SlimType]]]:
    rng = np.random.default_rng(20240611)
    tensors = {}
    for stype in fmt.SLIM_TYPES:
        for tag, (rows, n_groups, period) in SHAPES.items():
            tensors[f"{stype.name.lower()}.{tag}"] = (_random_tensor(stype, rows, n_groups, rng, period), stype)
    path = tmp_path_factory.mktemp("slim") / "kernels.gguf"
    _write_gguf(path, tensors)
    return path, tensors


def _run(tool: Path, *args, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, timeout=300, env=sanitizer_env() | (env or {}))
    assert sanitizer_report(r.stderr) is None, f"{tool.name} {' '.join(map(str, args))}:\n{r.stderr[-6000:]}"
    if check and r.returncode != 0:
        raise AssertionError(f"{tool.name} {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr}")
    return r


TENSOR_IDS = [f"{t.name.lower()}.{tag}" for t in fmt.SLIM_TYPES for tag in SHAPES]


def _unpack_rows(packed: np.ndarray, stype: fmt.SlimType, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 weights [rows, cols], offsets m [rows, groups]), row by row: a tensor's rows
    may differ in widths, which fmt.unpack (one pattern per tensor) rejects."""
    us = [fmt.unpack(packed[r : r + 1], stype, cols) for r in range(packed.shape[0])]
    w = np.concatenate([fmt.dequantize_codes(u.codes, u.d, u.m, stype.group_size) for u in us])
    return w, np.concatenate([u.m for u in us])


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# --- dequantization --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TENSOR_IDS)
def test_dequantize_bit_exact(dump_tool, model, name, tmp_path):
    path, tensors = model
    packed, stype = tensors[name]
    cols = packed.shape[1] // stype.block_bytes * stype.group_size
    expected, _ = _unpack_rows(packed, stype, cols)

    out = tmp_path / "deq.f32"
    _run(dump_tool, path, "dequant", name, out)
    got = np.fromfile(out, dtype=np.float32).reshape(expected.shape)
    assert _same_bits(got, expected), f"to_float differs from format.dequantize at {np.argwhere(got != expected)[:5]}"

    _run(dump_tool, path, "get-rows", name, out, THREADS)
    got = np.fromfile(out, dtype=np.float32).reshape(expected.shape)
    assert _same_bits(got, expected[::-1]), "GET_ROWS (rows last to first) differs from format.dequantize"


# --- mul_mat -------------------------------------------------------------------------------------


def _q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q8_1 activations: per 32 values, fp16 d = amax/127 and int8 round(x/d).
    Returns (the dequantized activations fp16(d) * q in float64, d per block in float64)."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.round(blocks * inv)  # ties: measure zero for random inputs
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    return (q * d).reshape(x.shape), np.broadcast_to(d, blocks.shape).reshape(x.shape)


def _check_mul_mat(got: np.ndarray, x: np.ndarray, packed: np.ndarray, stype: fmt.SlimType, cols: int) -> None:
    """got[n, r] against float64 references; x is [N, cols] float32.

    1. Against W @ x (W the exactly dequantized weights): the error allowed is what Q8_1
       activations can cause, |w| * (d_a/2 + 2^-10 |x|) per product (rounding to the int8 grid,
       the fp16 scale), plus |m| * |sum of x over a chunk| * 2^-10 per chunk (vec_dot uses m
       times Q8_1's fp16 sum s), plus 1e-5 of sum |w x| for float32 accumulation.
    2. Against W @ x_q (x_q: the activations on their emulated Q8_1 grid), a much tighter check
       that catches a single wrong code: 2^-10 * the s terms + 1e-5 of sum |w x_q| + one
       rounding flip of one activation (max |w| * d_a) between ggml's and this emulation.
    """
    w, m = _unpack_rows(packed, stype, cols)
    w = w.astype(np.float64)  # [R, cols]
    x64 = x.astype(np.float64)
    xq, da = _q8_1(x)
    g = stype.group_size
    m_cols = np.repeat(m.astype(np.float64), g, axis=1)  # offset of each weight's group [R, cols]
    chunk_sum = lambda v: np.abs(v.reshape(v.shape[0], -1, 32).sum(axis=-1))  # noqa: E731  [N, chunks]
    m_chunks = np.abs(m_cols[:, ::32])  # [R, chunks]
    s_term = chunk_sum(xq) @ m_chunks.T * 2.0**-10  # [N, R]

    err1 = np.abs(got - x64 @ w.T)
    tol1 = (da / 2 + np.abs(x64) * 2.0**-10) @ np.abs(w).T + chunk_sum(x64) @ m_chunks.T * 2.0**-10
    tol1 += 1e-5 * (np.abs(x64) @ np.abs(w).T) + 1e-6
    assert np.all(err1 <= tol1), f"mul_mat vs W @ x: worst error/tolerance {np.max(err1 / tol1):.3f}"

    err2 = np.abs(got - xq @ w.T)
    tol2 = s_term + 1e-5 * (np.abs(xq) @ np.abs(w).T) + np.max(da, axis=1, keepdims=True) * np.abs(w).max(axis=1) + 1e-6
    assert np.all(err2 <= tol2), f"mul_mat vs W @ Q8_1(x): worst error/tolerance {np.max(err2 / tol2):.3f}"


@pytest.mark.parametrize("buffer", ["cpu", "repack"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", TENSOR_IDS)
def test_mul_mat(variant, dump_tool, model, name, batch, buffer, tmp_path):
    path, tensors = model
    packed, stype = tensors[name]
    cols = packed.shape[1] // stype.block_bytes * stype.group_size
    rng = np.random.default_rng(batch * 7919 + cols)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    x[0, :32] *= 8.0  # one block with a wider range
    x_file, out = tmp_path / "x.f32", tmp_path / "y.f32"
    x.tofile(x_file)
    options = ["--repack"] if buffer == "repack" else []
    r = _run(dump_tool, *options, path, "mul-mat", name, x_file, batch, out, THREADS, check=not options)
    if options:
        _, _, period = SHAPES[name.split(".")[1]]
        if not (_interleaves(variant) and packed.shape[0] % 8 == 0):
            assert r.returncode == 1 and "refuses" in r.stderr, r.stderr
            return
        assert r.returncode == 0, r.stderr
        assert ("kept as is" if period == 1 else "interleaved by 8 rows") in r.stderr, r.stderr
    got = np.fromfile(out, dtype=np.float32).reshape(batch, packed.shape[0]).astype(np.float64)
    _check_mul_mat(got, x, packed, stype, cols)


@pytest.mark.parametrize("buffer", ["cpu", "repack"])
@pytest.mark.parametrize("name", TENSOR_IDS)
def test_mul_mat_id(variant, dump_tool, model, name, buffer, tmp_path):
    """MUL_MAT_ID (MoE): each row is a one-row expert (in the repack buffer, each block of 8
    rows, interleaved at load as llama.cpp does with a 3-D expert tensor); token t uses
    experts (3t + 5u + 1) % experts, u = 0, 1."""
    path, tensors = model
    packed, stype = tensors[name]
    rows, cols = packed.shape[0], packed.shape[1] // stype.block_bytes * stype.group_size
    per = 8 if buffer == "repack" else 1  # rows per expert
    tokens = 7  # the repack path's tiles of 4, 2 and 1 columns, when one expert gets them all
    x = np.random.default_rng(cols + rows).standard_normal((tokens, cols)).astype(np.float32)
    x_file, out = tmp_path / "x.f32", tmp_path / "y.f32"
    x.tofile(x_file)
    options = ["--repack"] if buffer == "repack" else []
    r = _run(dump_tool, *options, path, "mul-mat-id", name, x_file, tokens, out, THREADS, check=not options)
    if options:
        _, _, period = SHAPES[name.split(".")[1]]
        if not (_interleaves(variant) and rows % 8 == 0 and rows > 8):  # ggml's repack needs a 3-D stack
            assert r.returncode == 1 and ("refuses" in r.stderr or "experts of 8 rows" in r.stderr), r.stderr
            return
        assert r.returncode == 0, r.stderr
        assert ("kept as is" if period == 1 else "interleaved by 8 rows") in r.stderr, r.stderr
    got = np.fromfile(out, dtype=np.float32).reshape(tokens, 2, per).astype(np.float64)
    for u in range(2):
        experts = [(3 * t + 5 * u + 1) % (rows // per) for t in range(tokens)]
        # per token, the same check as mul_mat restricted to its expert's rows
        for t, e in enumerate(experts):
            _check_mul_mat(got[t : t + 1, u], x[t : t + 1], packed[e * per : (e + 1) * per], stype, cols)


# --- validation and refused ops ----------------------------------------------------------------


def _corrupt(packed: np.ndarray, stype: fmt.SlimType, how: str) -> np.ndarray:
    bad = packed.copy()
    row = bad.shape[0] // 2
    if how == "width-code":  # group 1 of the middle row gets code 3
        cols = packed.shape[1] // stype.block_bytes * stype.group_size
        pos = fmt.group_offsets(fmt.read_widths(packed[0], stype, cols), stype.group_size)[1]
        bad[row, pos] |= 0x01
        bad[row, pos + 1] |= 0x80
    elif how == "scale":  # fp16 inf scale in the first group, width code kept
        bad[row, 1] = (bad[row, 1] & 0x80) | 0x7C
        bad[row, 0] &= 0x01
    elif how == "overrun":  # the row's last group gets one width more (or less): the row no longer balances
        cols = packed.shape[1] // stype.block_bytes * stype.group_size
        pos = int(fmt.group_offsets(fmt.read_widths(packed[0], stype, cols), stype.group_size)[-1])
        d_bits = int(bad[row, pos]) | int(bad[row, pos + 1]) << 8
        code = ((d_bits >> 15) << 1) | (d_bits & 1)
        new = {0: 1, 1: 2, 2: 1}[code]
        d_bits = (d_bits & 0x7FFE) | ((new >> 1) << 15) | (new & 1)
        bad[row, pos], bad[row, pos + 1] = d_bits & 0xFF, d_bits >> 8
    return bad


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("width-code", "invalid width code 3"),
        ("scale", "non-finite scale"),
        ("overrun", "the widths average"),
    ],
)
@pytest.mark.parametrize("stype", [fmt.slim_type(2, 32), fmt.slim_type(3, 64), fmt.slim_type(4, 128)], ids=str)
def test_corrupt_data_is_rejected(dump_tool, tmp_path, how, message, stype):
    rng = np.random.default_rng(5)
    packed = _random_tensor(stype, 5, 6, rng)
    bad = _corrupt(packed, stype, how)
    with pytest.raises(fmt.FormatError):
        fmt.unpack(bad, stype, 6 * stype.group_size)
    path = tmp_path / "bad.gguf"
    _write_gguf(path, {"bad": (bad, stype), "good": (packed, stype)})

    assert _run(dump_tool, path, "validate", "good").returncode == 0
    for args in (["validate", "bad"], ["dequant", "bad", tmp_path / "o.f32"], ["get-rows", "bad", tmp_path / "o.f32"]):
        r = _run(dump_tool, path, *args, check=False)
        assert r.returncode == 2, f"{args}: exit {r.returncode} (a crash is negative), stderr:\n{r.stderr}"
        assert message in r.stderr and "row 2 is invalid" in r.stderr, r.stderr


def _unvalidated_rows(stype: fmt.SlimType, rows: int, codes: list[int], rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Rows whose groups, by their width codes, do not tile the row: the groups laid end to end
    (scale 1, offset 0, random codes), cut or zero-padded to the row's size. Returns the rows and
    how many whole groups lie inside each (a kernel must read none past them)."""
    n_groups, g = len(codes), stype.group_size
    row_bytes = stype.row_bytes(n_groups * g)
    parts, inside, end = [], 0, 0
    for code in codes:
        width = stype.widths[code]
        header = fmt.encode_header(np.float16(1.0), np.float16(0.0), np.uint16(code))
        parts.append(np.concatenate([header, rng.integers(0, 256, fmt.group_bytes(width, g) - 4, dtype=np.uint8)]))
        end += fmt.group_bytes(width, g)
        inside += end <= row_bytes
    row = np.concatenate(parts)[:row_bytes]
    row = np.pad(row, (0, row_bytes - row.size))
    return np.tile(row, (rows, 1)), inside


# (type, width codes per group): G32 rows whose wider groups fill the row one group early (the
# last header would lie past the row: past the tensor for the last rows), and rows whose groups
# run past the row's end
UNVALIDATED = {
    "slim2_g32-fills": (fmt.slim_type(2, 32), [2, 2, 2, 2, 0, 1]),
    "slim3_g32-fills": (fmt.slim_type(3, 32), [2, 2, 2, 2, 1, 1]),
    "slim4_g32-fills": (fmt.slim_type(4, 32), [2, 2, 2, 2, 2, 1]),
    "slim2_g64-overruns": (fmt.slim_type(2, 64), [2, 2, 2, 2, 2, 2]),
    "slim3_g128-overruns": (fmt.slim_type(3, 128), [1, 2, 2, 2, 2, 0]),
}


@pytest.mark.parametrize("case", UNVALIDATED)
def test_kernels_stay_inside_rows_that_skipped_validation(variant, dump_tool, tmp_path, case):
    """The loader validates every SliM row before anything reads it; rows that skipped
    validation anyway (llama-slim-dump --unchecked) are read only up to their end: dequantization
    gives the groups inside the row and zeros after, mul_mat agrees with it, and load-time
    repacking (16 rows, one width pattern) checks the row's extent before reading a header."""
    stype, codes = UNVALIDATED[case]
    g, n_groups = stype.group_size, len(codes)
    packed, inside = _unvalidated_rows(stype, 16, codes, np.random.default_rng(11))
    assert inside < n_groups
    path = tmp_path / "unvalidated.gguf"
    _write_gguf(path, {"t": (packed, stype)})
    assert _run(dump_tool, path, "validate", "t", check=False).returncode == 2

    deq_file = tmp_path / "deq.f32"
    _run(dump_tool, "--unchecked", path, "dequant", "t", deq_file)
    deq = np.fromfile(deq_file, dtype=np.float32).reshape(16, n_groups * g)
    assert np.all(deq[:, inside * g :] == 0), "values from past the row's end"
    limit = 1 << max(stype.widths[c] for c in codes[:inside])
    assert np.all((deq[:, : inside * g] >= 0) & (deq[:, : inside * g] < limit) & (deq[:, : inside * g] == np.round(deq[:, : inside * g])))

    x = np.random.default_rng(3).standard_normal((3, n_groups * g)).astype(np.float32)
    x_file, out = tmp_path / "x.f32", tmp_path / "y.f32"
    x.tofile(x_file)
    buffers = [[], ["--repack"]] if _interleaves(variant) else [[]]
    for options in buffers:
        r = _run(dump_tool, *options, "--unchecked", path, "mul-mat", "t", x_file, 3, out, THREADS)
        if options:
            assert "kept as is" in r.stderr, r.stderr
        got = np.fromfile(out, dtype=np.float32).reshape(3, 16).astype(np.float64)
        ref = x.astype(np.float64) @ deq.astype(np.float64).T
        assert np.all(np.abs(got - ref) <= 0.02 * (np.abs(x) @ np.abs(deq).T) + 1e-3), f"{options}: {np.abs(got - ref).max()}"


def test_ops_inside_rows_are_refused(dump_tool, model):
    path, tensors = model
    for name in ("slim2_g32.a", "slim3_g64.a", "slim4_g128.a"):
        lines = _run(dump_tool, path, "check-ops", name).stdout.split("\n")
        result = dict(line.split("\t") for line in lines if line)
        assert result.pop("mul_mat") == "supported"
        assert result.pop("get_rows") == "supported"
        assert result.pop("mul_mat_row_view") == "supported"
        assert result and all(v == "refused" for v in result.values()), f"{name}: {result}"


def test_unnamed_type_ids_are_invalid(dump_tool, tmp_path):
    """Ids between upstream's last (42) and the SliM range name no type: gguf rejects them."""
    import gguf

    path = tmp_path / "hole.gguf"
    writer = gguf.GGUFWriter(str(path), "slimtest")
    writer.add_tensor("t", np.zeros((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    # tensor info: name (u64 length + bytes), n_dims (u32), ne (u64 each), type (u32)
    pos = data.index((1).to_bytes(8, "little") + b"t" + (2).to_bytes(4, "little"))
    type_at = pos + 8 + 1 + 4 + 2 * 8
    assert int.from_bytes(data[type_at : type_at + 4], "little") == 0
    data[type_at : type_at + 4] = (500).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    r = _run(dump_tool, path, "list", check=False)
    assert r.returncode != 0 and "invalid ggml type 500" in r.stderr, r.stderr


# --- llama.cpp's IQ4_XS, Q3_K, Q2_K, Q4_K, IQ4_NL, IQ3_S and IQ3_XXS interleaved by 8 rows ---------

# stock type -> offsets of its fp16 (super-)scales (d, and dmin for Q2_K and Q4_K) in a block; tag -> (rows, 256s of weights)
STOCK_X8 = {"iq4_xs": (0,), "q3_k": (108,), "q2_k": (80, 82), "q4_k": (0, 2), "iq4_nl": (0,), "iq3_s": (0,), "iq3_xxs": (0,)}
STOCK_X8_SHAPES = {"a": (7, 2), "x8": (16, 2), "x8experts": (24, 1)}


def _ggml_type(stock: str):
    import gguf

    return gguf.GGMLQuantizationType[stock.upper()]


@pytest.fixture(scope="module")
def stock_x8_model(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Random rows of the stock types (any scale, index, code and sign bytes are valid) with fp16 super-scales of either sign."""
    import gguf

    rng = np.random.default_rng(20261204)
    tensors = {}
    for stock, scales_at in STOCK_X8.items():
        block, size = gguf.GGML_QUANT_SIZES[_ggml_type(stock)]
        for tag, (rows, n256) in STOCK_X8_SHAPES.items():
            blocks = n256 * 256 // block
            raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
            for at in scales_at:
                d = (rng.uniform(1e-4, 1e-2, size=(rows, blocks)) * rng.choice([-1, 1], size=(rows, blocks))).astype(np.float16)
                raw[..., at : at + 2] = d.view(np.uint8).reshape(rows, blocks, 2)
            tensors[f"{stock}.{tag}"] = raw.reshape(rows, blocks * size)
    path = tmp_path_factory.mktemp("stock_x8") / "stock_x8.gguf"
    writer = gguf.GGUFWriter(str(path), "slimtest")
    for name, packed in tensors.items():
        writer.add_tensor(name, packed, raw_dtype=_ggml_type(name.split(".")[0]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tensors


def _stock_weights(name: str, packed: np.ndarray) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(packed, _ggml_type(name.split(".")[0])).astype(np.float64)


def _q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q8_K activations: per 256 values, iscale = -127 / (the value of largest magnitude),
    int8 min(127, round(iscale x)), float32 d = 1 / iscale. Returns (d q in float64, |d| per block)."""
    blocks = x.reshape(x.shape[0], -1, 256).astype(np.float32)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)
    iscale = np.float32(-127) / peak
    q = np.minimum(np.rint(blocks * iscale), 127)
    d = (np.float32(1) / iscale).astype(np.float64)
    return (q * d).reshape(x.shape), np.abs(d[..., 0])


def _q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q8_0 activations (IQ4_NL's): per 32 values, d = amax / 127 stored as fp16, int8
    round(x 127 / amax). Returns (d q in float64, d per block)."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    q = np.rint(blocks * (np.float32(127) / np.where(amax > 0, amax, 1)))
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    return (q * d).reshape(x.shape), d[..., 0]


def _q8(stock: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The activations as the stock type's vec_dot type quantizes them."""
    return _q8_0(x) if stock == "iq4_nl" else _q8_k(x)


def _check_q8_mul_mat(stock: str, got: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """got[n, r] against W @ x_q in float64 (x_q on its emulated Q8_K or Q8_0 grid): float32 accumulation
    (1e-5 of sum |w x_q|) and one rounding flip of one activation between ggml and the emulation."""
    xq, d = _q8(stock, x)
    err = np.abs(got - xq @ w.T)
    tol = 1e-5 * (np.abs(xq) @ np.abs(w).T) + d.max(axis=1, keepdims=True) * np.abs(w).max(axis=1) + 1e-6
    assert np.all(err <= tol), f"{stock} mul_mat vs W @ Q8(x): worst error/tolerance {np.max(err / tol):.3f}"


# 600 columns: llama.cpp's tiled kernel on the rows put back into plain blocks (forced: by
# default IQ4_XS, Q3_K, Q2_K and Q4_K take it only in builds with its AVX512-VNNI path; IQ4_NL,
# IQ3_S and IQ3_XXS are not put back, their tiles run), the 8-row tiles over more columns than one panel (it
# switched off), and the build's default
TILED_ENV = {"default": {}, "force": {"GGML_CPU_TILED_MM_FORCE": "1"}, "off": {"GGML_CPU_TILED_MM": "0"}}


@pytest.mark.parametrize(("batch", "tiled"), [(1, "default"), (7, "default"), (600, "force"), (600, "off"), (600, "default")])
@pytest.mark.parametrize("tag", ["a", "x8"])
@pytest.mark.parametrize("stock", list(STOCK_X8))
def test_stock_mul_mat_interleaved(variant, dump_tool, stock_x8_model, stock, tag, batch, tiled, tmp_path):
    """IQ4_XS, Q3_K, Q2_K, Q4_K, IQ4_NL, IQ3_S and IQ3_XXS in CPU_REPACK against llama.cpp's own kernels for them (the
    tensor in a plain CPU buffer): both integer-exact per (super-)block, so equal to float32 rounding (a
    wrong code or scale moves a product by orders of magnitude more), and both against W @ Q8_K(x) (Q8_0 for IQ4_NL)."""
    path, tensors = stock_x8_model
    name = f"{stock}.{tag}"
    w = _stock_weights(name, tensors[name])
    x = np.random.default_rng(batch).standard_normal((batch, w.shape[1])).astype(np.float32)
    x[0, :32] *= 8.0
    x_file, out = tmp_path / "x.f32", tmp_path / "y.f32"
    x.tofile(x_file)
    env = TILED_ENV[tiled]
    _run(dump_tool, path, "mul-mat", name, x_file, batch, out, THREADS, env=env)
    plain = np.fromfile(out, dtype=np.float32).reshape(batch, w.shape[0]).astype(np.float64)
    _check_q8_mul_mat(stock, plain, x, w)
    r = _run(dump_tool, "--repack", path, "mul-mat", name, x_file, batch, out, THREADS, check=False, env=env)
    if not (_interleaves(variant) and w.shape[0] % 8 == 0):
        assert r.returncode == 1 and "refuses" in r.stderr, r.stderr
        return
    assert r.returncode == 0 and "interleaved by 8 rows" in r.stderr, r.stderr
    got = np.fromfile(out, dtype=np.float32).reshape(batch, w.shape[0]).astype(np.float64)
    xq, _ = _q8(stock, x)
    tol = 1e-5 * (np.abs(xq) @ np.abs(w).T) + 1e-6
    assert np.all(np.abs(got - plain) <= tol), f"8-row {stock} vs llama.cpp's: worst {np.max(np.abs(got - plain) / tol):.3f}"


@pytest.mark.parametrize("stock", list(STOCK_X8))
def test_stock_mul_mat_id_interleaved(variant, dump_tool, stock_x8_model, stock, tmp_path):
    """MUL_MAT_ID on IQ4_XS, Q3_K, Q2_K, Q4_K, IQ4_NL, IQ3_S and IQ3_XXS stacks of experts of 8 rows in
    CPU_REPACK: token t uses experts (3t + 5u + 1) % 3 (IQ3_S's and IQ3_XXS's in their larger layout,
    experts that size apart)."""
    if not _interleaves(variant):
        pytest.skip("this build does not interleave (no AVX2/FMA/F16C)")
    path, tensors = stock_x8_model
    name, tokens, per = f"{stock}.x8experts", 7, 8
    w = _stock_weights(name, tensors[name])
    experts = w.shape[0] // per
    x = np.random.default_rng(tokens).standard_normal((tokens, w.shape[1])).astype(np.float32)
    x_file, out = tmp_path / "x.f32", tmp_path / "y.f32"
    x.tofile(x_file)
    r = _run(dump_tool, "--repack", path, "mul-mat-id", name, x_file, tokens, out, THREADS, check=False)
    assert r.returncode == 0 and "interleaved by 8 rows" in r.stderr, r.stderr
    got = np.fromfile(out, dtype=np.float32).reshape(tokens, 2, per).astype(np.float64)
    for u in range(2):
        for t in range(tokens):
            e = (3 * t + 5 * u + 1) % experts
            _check_q8_mul_mat(stock, got[t : t + 1, u], x[t : t + 1], w[e * per : (e + 1) * per])


# --- ggml's own test -----------------------------------------------------------------------------

_QUANTIZE_FNS_LINE = re.compile(r"^\s*(slim\d_g\d+) ([a-z ()=\d]+?):\s+(ok|FAILED)", re.MULTILINE)


def test_quantize_fns(variant):
    """test-quantize-fns on the SliM types: round trip through the reference quantizer, the CPU
    from_float against from_float_ref, and vec_dot against float dot products."""
    tool = llamacpp.binary("test-quantize-fns", cpu=variant)
    out = _run(tool, "-v", check=False).stdout
    results = {(t, check): verdict for t, check, verdict in _QUANTIZE_FNS_LINE.findall(out)}
    names = {t.name.lower() for t in fmt.SLIM_TYPES}
    assert {t for t, _ in results} == names, out[-2000:]
    assert len(results) == 3 * len(names), sorted(results)
    failed = sorted(k for k, v in results.items() if v != "ok")
    assert not failed, f"test-quantize-fns failed {failed}:\n{out[-2000:]}"
