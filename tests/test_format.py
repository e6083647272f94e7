"""docs/FORMAT.md as implemented by slim2gguf.format: round trips, sizes, rejection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slim2gguf import format as fmt


def random_tensor(rng: np.random.Generator, stype: fmt.SlimType, rows: int, n_groups: int, moved: int):
    """Codes/d/m for a balanced width pattern with ``moved`` groups up and as many down."""
    widths = np.full(n_groups, stype.bits)
    perm = rng.permutation(n_groups)
    widths[perm[:moved]] = stype.bits - 1
    widths[perm[moved : 2 * moved]] = stype.bits + 1
    g = stype.group_size
    codes = np.concatenate([rng.integers(0, 1 << int(k), (rows, g)) for k in widths], axis=1).astype(np.uint8)
    d_bits = rng.integers(0, 0x7C00, (rows, n_groups)).astype(np.uint16) & fmt.SCALE_VALUE_MASK
    m = rng.standard_normal((rows, n_groups)).astype(np.float16)
    return codes, d_bits.view(np.float16), m, widths


@pytest.mark.parametrize("stype", fmt.SLIM_TYPES, ids=lambda t: t.name)
def test_round_trip_every_type(stype):
    rng = np.random.default_rng(stype.type_id)
    codes, d, m, widths = random_tensor(rng, stype, rows=5, n_groups=7, moved=3)
    packed = fmt.pack(codes, d, m, widths, stype)
    assert packed.shape == (5, stype.row_bytes(7 * stype.group_size))
    out = fmt.unpack(packed, stype, 7 * stype.group_size)
    np.testing.assert_array_equal(out.codes, codes)
    np.testing.assert_array_equal(out.widths, widths)
    np.testing.assert_array_equal(out.d.view(np.uint16), d.view(np.uint16))
    np.testing.assert_array_equal(out.m.view(np.uint16), m.view(np.uint16))


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(fmt.AVERAGE_BITS),
    group_size=st.sampled_from(fmt.GROUP_SIZES),
    rows=st.integers(1, 9),
    n_groups=st.integers(1, 11),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_round_trip_property(bits, group_size, rows, n_groups, seed, data):
    stype = fmt.slim_type(bits, group_size)
    moved = data.draw(st.integers(0, n_groups // 2))
    codes, d, m, widths = random_tensor(np.random.default_rng(seed), stype, rows, n_groups, moved)
    packed = fmt.pack(codes, d, m, widths, stype)
    np.testing.assert_array_equal(fmt.unpack(packed, stype, n_groups * group_size).codes, codes)
    expected = codes.reshape(rows, n_groups, group_size) * d.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]
    assert fmt.dequantize(packed, stype, n_groups * group_size).tobytes() == expected.reshape(rows, -1).tobytes()


def test_documented_layout_of_one_group():
    """A 3-bit, 32-column group: header, then P2 then P1, as docs/FORMAT.md draws it."""
    stype = fmt.slim_type(3, 32)
    codes = (np.arange(32) % 8).astype(np.uint8)[None, :]
    d = np.array([[1.0]], dtype=np.float16)
    m = np.array([[-2.0]], dtype=np.float16)
    row = fmt.pack(codes, d, m, np.array([3]), stype)[0]
    d_bits = int(row[0]) | int(row[1]) << 8
    assert d_bits == (0x3C00 | 1)  # 1.0 with width code 1 (= b) in bit 0
    assert row[2:4].view("<f2")[0] == -2.0
    low = codes[0] & 3
    p2 = row[4:12]
    assert all(p2[i] == low[i] | low[i + 8] << 2 | low[i + 16] << 4 | low[i + 24] << 6 for i in range(8))
    high = (codes[0] >> 2) & 1
    assert int.from_bytes(row[12:16].tobytes(), "little") == sum(int(b) << e for e, b in enumerate(high))


def test_bits_per_weight_and_ids():
    assert [t.type_id for t in fmt.SLIM_TYPES] == list(range(1000, 1009))
    assert fmt.slim_type(2, 64).bits_per_weight == 2.5
    assert fmt.slim_type(4, 128).bits_per_weight == 4.25
    assert fmt.type_from_id(1004) == fmt.slim_type(3, 64)
    assert fmt.type_from_id(2) is None


def test_rejects_unbalanced_widths_and_bad_codes():
    stype = fmt.slim_type(2, 32)
    rng = np.random.default_rng(0)
    codes, d, m, widths = random_tensor(rng, stype, 2, 4, 1)
    with pytest.raises(fmt.FormatError, match="average"):
        fmt.pack(codes, d, m, np.array([3, 3, 2, 2]), stype)
    packed = fmt.pack(codes, d, m, widths, stype)
    bad = packed.copy()
    bad[0, 0] |= 1
    bad[0, 1] |= 0x80  # width code 3
    with pytest.raises(fmt.FormatError):
        fmt.unpack(bad, stype, 4 * 32)
    zeros = np.zeros((1, 4 * 32), dtype=np.uint8)
    row_a = fmt.pack(zeros, d[:1], m[:1], np.array([1, 3, 2, 2]), stype)
    row_b = fmt.pack(zeros, d[:1], m[:1], np.array([3, 1, 2, 2]), stype)
    with pytest.raises(fmt.FormatError, match="share one width pattern: row 1's group 0 has width code 2, row 0's has 0$"):
        fmt.unpack(np.concatenate([row_a, row_b]), stype, 4 * 32)
    with pytest.raises(fmt.FormatError, match="share one width pattern: row 1's group 0 has width code 3, which no type has, row 0's has 0$"):
        fmt.unpack(np.concatenate([row_a, bad[:1]]), stype, 4 * 32)  # a bad code in another row than the first: its row named
    with pytest.raises(fmt.FormatError, match="take"):
        fmt.unpack(packed[:, :-1], stype, 4 * 32)
    infinite = packed.copy()
    infinite[1, 2:4] = np.array([np.inf], dtype="<f2").view(np.uint8)  # row 1, group 0's offset m
    with pytest.raises(fmt.FormatError, match="a group's scale or offset is not finite"):
        fmt.unpack(infinite, stype, 4 * 32)


def test_gguf_registration_keeps_standard_types():
    fmt.register_gguf_types()
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    assert GGMLQuantizationType(1001).name == "SLIM2_G64"
    assert GGML_QUANT_SIZES[GGMLQuantizationType(1001)] == (64, 20)
    assert GGMLQuantizationType(8) == GGMLQuantizationType.Q8_0


def test_gguf_py_quants_on_slim_types_as_on_its_own():
    """No rows dequantize to no rows (numpy's reshape error before), and quantizing to a SliM
    type is gguf-py's NotImplementedError (an AttributeError from inside gguf before)."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    fmt.register_gguf_types()
    stype = fmt.slim_type(3, 128)
    qtype = GGMLQuantizationType(stype.type_id)
    empty = quants.dequantize(np.zeros((0, 2 * stype.block_bytes), np.uint8), qtype)
    assert empty.shape == (0, 256) and empty.dtype == np.float32
    assert quants.dequantize(np.zeros((0, 34), np.uint8), GGMLQuantizationType.Q8_0).shape == (0, 32)
    with pytest.raises(NotImplementedError, match=f"Quantization for {stype.name} is not in gguf-py"):
        quants.quantize(np.zeros((8, 128), np.float32), qtype)


def test_gguf_py_reads_experts_with_their_own_width_patterns(tmp_path):
    """A 3-D tensor's experts may each have their own width pattern (FORMAT.md); gguf-py's
    reader walked every row by the first row's pattern ("a group's scale or offset is not
    finite"), and inspect counted expert 0's widths for all."""
    import gguf
    import torch
    from export_helpers import random_qtensor

    from slim2gguf.inspect_gguf import dequantize_tensor, inspect_rows

    fmt.register_gguf_types()
    gen = torch.Generator().manual_seed(3)
    experts = [random_qtensor(16, 256, 3, 32, gen) for _ in range(3)]
    assert len({tuple(e.widths.tolist()) for e in experts}) == 3  # three patterns
    stype = experts[0].stype
    packed = np.stack([e.pack() for e in experts])  # [expert, rows, row_bytes], as the converter stacks them
    writer = gguf.GGUFWriter(tmp_path / "moe.gguf", arch="qwen3moe")
    writer.add_tensor("blk.0.ffn_down_exps.weight", packed, raw_dtype=gguf.GGMLQuantizationType(stype.type_id))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(fmt.FormatError, match="rows of one tensor must share one width pattern"):
        fmt.unpack(packed.reshape(-1, packed.shape[-1]), stype, 256)  # read as one matrix: refused as such
    tensor = gguf.GGUFReader(tmp_path / "moe.gguf").tensors[0]
    expected = np.stack([e.dequantize().numpy() for e in experts])
    assert np.array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type), expected)
    assert np.array_equal(dequantize_tensor(tmp_path / "moe.gguf", tensor.name), expected)
    counts: dict[int, int] = {}
    for expert in experts:
        for width in expert.widths.tolist():
            counts[width] = counts.get(width, 0) + 16
    assert inspect_rows(tmp_path / "moe.gguf")[0]["widths"] == dict(sorted(counts.items()))
