"""Stock ggml types (slim2gguf.storage): bytes as ggml stores them, values as GPTQ used them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from export_helpers import random_qtensor
from gguf import GGMLQuantizationType as QT
from gguf import quants

from slim2gguf import format as fmt
from slim2gguf.gptq import damped_hessian
from slim2gguf.methods import QuantSettings, quantize_linear
from slim2gguf.qtensor import NativeTensor, stored_tensor
from slim2gguf.storage import NATIVE_TYPES, native_type, stored_type
from slim2gguf.storage.lattice import Lattice
from tests.test_quantizer import hessian, layer_problem, output_error

TYPES = sorted(NATIVE_TYPES)


def random_fields(stype, n: int, gen: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random codes and fields of every kind the type stores (fp16 scales of either sign,
    integer sub-scales over their whole range), with the extremes planted in blocks 0 and 1."""
    if isinstance(stype, Lattice):  # codes must name grid points: round random weights onto the grid
        w = torch.from_numpy(gen.standard_normal((n, stype.block_size)).astype(np.float32)) * float(np.abs(stype.levels).max()) / 2
        codes = stype.round(w, torch.ones(n), torch.zeros(n))[0].numpy().astype(np.uint8)
    else:
        codes = gen.integers(0, len(stype.levels), size=(n, stype.block_size)).astype(np.uint8)
        codes[0] = 0
        codes[1] = len(stype.levels) - 1
    fields = {}
    for key, value in stype.fit(torch.zeros(1, stype.block_size), torch.ones(stype.block_size)).fields.items():
        if value.dtype == torch.float16:
            scale = gen.standard_normal(n) * 0.01
            fields[key] = (np.abs(scale) if key == "dmin" else scale).astype(np.float16)
        else:
            lo, hi = stype.scale_range
            ints = gen.integers(lo, hi + 1, size=(n, stype.n_sub))
            ints[0], ints[1] = lo, hi
            fields[key] = ints.astype(np.int8 if lo < 0 else np.uint8)
    return codes, fields


@pytest.mark.parametrize("name", TYPES)
def test_bytes_decode_to_what_was_encoded_and_gguf_py_agrees_bit_for_bit(name):
    stype = native_type(name)
    codes, fields = random_fields(stype, 64, np.random.default_rng(1))
    blocks = stype.encode(codes, fields)
    assert blocks.shape == (64, stype.type_size) and blocks.dtype == np.uint8
    back, back_fields = stype.decode(blocks)
    assert np.array_equal(back, codes)
    assert back_fields.keys() == fields.keys()
    for key in fields:
        assert np.array_equal(back_fields[key], fields[key]), key
    rows = blocks.reshape(4, -1)
    ours = stype.dequantize(rows).numpy()
    reference = quants.dequantize(rows, QT(stype.ggml_type)).astype(np.float32)
    assert ours.shape == (4, 16 * stype.block_size)
    assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", ["rtn", "gptq", "slim"])
def test_file_holds_exactly_the_weights_the_quantizer_produced(name, method):
    """GPTQ's error feedback ran on the very values the packed rows dequantize to."""
    w, x = layer_problem(5, out=24, inp=512)
    w[3] = 0  # a dead row: zero scales
    nt, _ = quantize_linear(w, hessian(x), None, QuantSettings(method, native=name))
    assert isinstance(nt, NativeTensor) and nt.shape == (24, 512)
    data = nt.pack()
    assert data.shape == (24, native_type(name).row_bytes(512))
    from_file = quants.dequantize(data, QT(native_type(name).ggml_type)).astype(np.float32)
    assert np.array_equal(nt.dequantize().numpy().view(np.uint32), from_file.view(np.uint32))
    assert output_error(w, x, nt) < (0.2 if name.startswith(("q2", "iq2")) else 0.06 if name.startswith(("q3", "iq3")) else 0.02)


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "iq4_xs", "q4_0", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xxs"])
def test_gptq_beats_rounding_to_nearest_in_the_same_type(name):
    w, x = layer_problem(11, out=64, inp=512)
    rtn, _ = quantize_linear(w, None, None, QuantSettings("rtn", native=name))
    slim, _ = quantize_linear(w, hessian(x), None, QuantSettings("slim", native=name))
    assert output_error(w, x, slim) < 0.8 * output_error(w, x, rtn)


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0"])
def test_fit_is_no_worse_than_gguf_py_reference_rounding(name):
    """The scale search includes the reference's scale (largest weight on the end level),
    so, evenly weighted, its error cannot exceed gguf-py's quantize_blocks."""
    stype = native_type(name)
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    ours, _ = quantize_linear(w, None, None, QuantSettings("rtn", native=name))
    reference = quants.dequantize(quants.quantize(w.numpy(), QT(stype.ggml_type)), QT(stype.ggml_type))
    assert float((ours.dequantize() - w).pow(2).sum()) <= float(((torch.from_numpy(reference) - w) ** 2).sum())


@pytest.mark.parametrize(("asked", "stored"), [("q4_k", "q5_0"), ("q2_k", "iq4_nl"), ("q6_k", "q8_0"), ("q5_k", "q5_1"), ("iq2_xxs", "iq4_nl")])
def test_rows_the_blocks_do_not_divide_fall_back_as_llama_quantize(asked, stored):
    w, x = layer_problem(4, out=8, inp=288)
    nt, _ = quantize_linear(w, hessian(x), None, QuantSettings("slim", native=asked))
    assert nt.type_name == stored
    assert nt.data.shape == (8, native_type(stored).row_bytes(288))


def test_unknown_type_and_bad_shapes_say_so():
    with pytest.raises(ValueError, match="native type must be one of"):
        QuantSettings(native="q4_z")
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_linear(torch.randn(4, 48), None, None, QuantSettings("rtn", native="q4_k"))
    with pytest.raises(ValueError, match="bpw"):
        QuantSettings(native="q4_k", bpw=4.0)


@pytest.mark.parametrize("name", TYPES)
def test_refit_of_the_free_scales_never_raises_the_output_error(name):
    """Rows whose re-solved fp16 scales would not lower (w − ŵ) H (w − ŵ)ᵀ keep GPTQ's
    (H damped as GPTQ and the refit use it)."""
    w, x = layer_problem(6, out=48, inp=512)
    h = hessian(x)
    settings = QuantSettings("slim", native=name)
    kept, _ = quantize_linear(w, h, None, replace(settings, refit=False))
    refit, _ = quantize_linear(w, h, None, settings)
    assert not torch.equal(kept.data, refit.data)
    damped, _ = damped_hessian(h, w, settings.damp)

    def row_errors(nt):
        err = nt.dequantize() - w
        return ((err @ damped) * err).sum(dim=1)

    # The refit judges rows by the normal equations' float32 loss, whose terms cancel: ties can land 2e-5 either side.
    assert bool((row_errors(refit) <= row_errors(kept) * (1 + 1e-4) + 1e-12).all())
    assert float(row_errors(refit).sum()) < float(row_errors(kept).sum())


@pytest.mark.parametrize("kind", ["slim", "q4_k", "iq4_nl"])
def test_slim_and_stock_tensors_answer_the_same_interface(kind):
    """What checkpoints, export and the readers use, without asking the family: the type
    found again by its ggml id, packed rows of its row size that dequantize to the tensor's
    values, the manifest entry that loads the tensor back, the file's keys."""
    gen = torch.Generator().manual_seed(0)
    if kind == "slim":
        qt = random_qtensor(8, 256, 3, 64, gen)
    else:
        qt, _ = quantize_linear(torch.randn(8, 256, generator=gen), None, None, QuantSettings("rtn", native=kind))
    stype = stored_type(qt.stype.ggml_type)
    assert stype == qt.stype and stype.name == qt.stype.name
    packed = qt.pack()
    assert packed.shape == (8, stype.row_bytes(256)) and stype.bits_per_weight == 8 * packed.shape[1] / 256
    assert torch.equal(stype.dequantize(packed), qt.dequantize())
    back = stored_tensor(qt.tensors("x"), "x", {**qt.meta(), "shape": [8, 256]}, group_size=128)
    assert type(back) is type(qt) and np.array_equal(back.pack(), packed)
    kvs = stype.file_kvs()
    assert (kvs["native"] is None) == (kind == "slim") and kvs["bits"] == int(stype.bits_per_weight)
    assert bool(qt.group_widths()) == (kind == "slim")
    assert (fmt.type_from_id(kvs["file_type"]) == stype) == (kind == "slim")


def test_a_stock_tensor_of_the_wrong_row_size_does_not_load():
    qt, _ = quantize_linear(torch.randn(4, 256), None, None, QuantSettings("rtn", native="q4_k"))
    data = {"x.data": qt.data[:, :-1]}
    with pytest.raises(ValueError, match="not q4_k rows of 256 columns"):
        stored_tensor(data, "x", {"type": "q4_k", "shape": [4, 256]}, group_size=128)


def test_lattice_sign_parity_is_ggml_ksigns():
    """Seven stored sign bits per 8 weights; the eighth (bit 7) makes the negatives even, as ggml's ksigns table."""
    ksigns = np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8)
    bits = Lattice._unsigned(np.arange(128, dtype=np.uint8).reshape(1, 128))
    assert np.array_equal(np.packbits(bits.reshape(128, 8), axis=1, bitorder="little").reshape(128), ksigns)


@pytest.mark.parametrize("name", ["iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"])
def test_lattice_runs_land_on_grid_points_with_the_stored_signs(name):
    """Every run GPTQ rounds is a grid point (the encoder finds its index); where signs come
    7 bits per 8 weights, an even number of each 8 is negative; anything else is refused."""
    stype = native_type(name)
    w, x = layer_problem(7, out=16, inp=256)
    nt, _ = quantize_linear(w, hessian(x), None, QuantSettings("slim", native=name))
    codes, fields = stype.decode(nt.pack().reshape(-1, stype.type_size))
    rounded, _ = stype.round(w[:, :256], torch.full((16,), 1e-3), torch.zeros(16))  # what GPTQ's runs get, before packing
    negative = (rounded < len(stype.levels) // 2).reshape(-1, 8).sum(dim=1)
    assert not stype.even_signs or bool((negative % 2 == 0).all())
    assert np.array_equal(stype.encode(codes, fields), nt.pack().reshape(-1, stype.type_size))
    off = codes.copy()
    off[0, 0] = len(stype.levels) - 1 - off[0, 0]  # the same magnitude, the other sign
    if stype.even_signs:
        with pytest.raises(ValueError, match="odd number"):
            stype.encode(off, fields)
    n = len(stype.levels) // 2
    missing = int(np.flatnonzero(stype._index_of < 0)[0])  # magnitudes no grid point has
    off = codes.copy()
    off[:, : stype.vector] = n + missing // n ** np.arange(stype.vector) % n
    with pytest.raises(ValueError, match="off the grid"):
        stype.encode(off, fields)


@pytest.mark.parametrize("name", ["iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"])
def test_lattice_search_finds_the_nearest_grid_point_under_the_weights(name, monkeypatch):
    """The batched search (chunked over rows) against scoring every grid point one run at a
    time: the same least weighted distance for runs of every shape a fit or GPTQ passes."""
    from slim2gguf.storage import lattice

    stype = native_type(name)
    grid = stype._grid
    gen = torch.Generator().manual_seed(5)
    monkeypatch.setitem(lattice.SCORE_ELEMENTS, "cpu", 3 * 2 * grid.shape[0])  # several chunks of rows
    for rows, runs, per in ((9, 3, 2), (5, 1, 1), (4, 2, 1)):
        y = torch.rand(rows, runs, per, stype.vector, generator=gen) * float(grid.max()) * 1.2
        a = torch.rand(runs, per, stype.vector, generator=gen)
        a[0, 0, 0] = 0  # a weight the loss ignores
        found = stype._nearest(y, a)
        cost = (a[None, :, :, None, :] * (y[:, :, :, None, :] - grid) ** 2).sum(-1)  # [R, M, P, G]
        assert torch.allclose(cost.gather(-1, found[..., None])[..., 0], cost.min(-1).values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in TYPES if not native_type(n)._uniform])
def test_nearest_non_uniform_level_agrees_with_bucketize(name):
    """The table lookup behind ``nearest`` gives torch.bucketize's code for every x: on and
    just beside each midpoint (a tie goes to the lower level), far outside, ±inf and NaN."""
    stype = native_type(name)
    mids = stype._mids
    x = torch.cat([
        mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), mids + 0.25, mids - 0.25,
        torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * float(mids.abs().max()),
        torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), -float("inf"), float("nan")]),
    ])
    assert torch.equal(stype.nearest(x), torch.bucketize(x, mids))
