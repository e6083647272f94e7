"""Seeds and a mutator for fuzzing llama.cpp's loading of SliM GGUF files (tests/e2e/test_fuzz_loader.py).

The seeds (tests/data/fuzz-seeds, made by ``python tests/gguf_mutator.py``) are a tiny LLaMA
model whose linears are SliM tensors of several types, 8k-row tensors (repacked at load
time) and one that is not, and a LoRA adapter with SliM tensors, which llama.cpp must refuse.
Each mutation changes one thing a hostile file could change: a header field, a key's value,
a tensor's name, dimensions, type or offset, the file's length, bytes anywhere, or inside a
SliM row a width code, a scale or offset (NaN, inf) or payload bytes. Where only SliM row
bytes change, :func:`rows_valid` says whether the file is still valid (the rules of
ggml_validate_row_data, docs/FORMAT.md), so llama.cpp's verdict can be checked, not just its
survival.
"""

from __future__ import annotations

import random
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slim2gguf import format as fmt

SEED_DIR = Path(__file__).parent / "data" / "fuzz-seeds"
MODEL_SEED, LORA_SEED = "llama-slim.gguf", "lora-slim.gguf"

# the seed model: head_dim 32, 8k rows everywhere but the output (262 rows, the vocabulary: not repacked)
N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER = 128, 256, 4, 2, 2
# a SliM type per linear, block by block: every group size, every width
BLOCK_TYPES = ({"attn_q": (2, 32), "attn_k": (3, 32), "attn_v": (4, 32), "attn_output": (2, 64),
                "ffn_gate": (3, 64), "ffn_up": (4, 64), "ffn_down": (2, 128)},
               {"attn_q": (3, 128), "attn_k": (4, 128), "attn_v": (2, 32), "attn_output": (3, 32),
                "ffn_gate": (4, 32), "ffn_up": (2, 64), "ffn_down": (3, 128)})  # fmt: skip
OUTPUT_TYPE = (4, 32)
LORA_RANK = 32

# GGUF value types (gguf.GGUFValueType) and the struct format of the scalar ones
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_INTERESTING = (0, 1, 2, 7, 8, 31, 32, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
                0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)  # fmt: skip


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary llama.cpp loads: specials, the 256 byte tokens, words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁the", "▁a", "▁of"]
    types = [2, 3, 3] + [6] * 256 + [1, 1, 1]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0]
    return tokens, scores, types


def _slim(rows: int, cols: int, bits: int, group: int, rng: np.random.Generator) -> tuple[np.ndarray, fmt.SlimType]:
    """Random packed rows with a balanced width pattern that moves at least one group."""
    stype = fmt.slim_type(bits, group)
    n_groups = cols // group
    widths = np.full(n_groups, bits)
    moved = rng.integers(1, n_groups // 2 + 1) if n_groups > 1 else 0
    order = rng.permutation(n_groups)
    widths[order[:moved]], widths[order[moved : 2 * moved]] = bits + 1, bits - 1
    codes = rng.integers(0, 1 << 8, (rows, cols)) >> (8 - np.repeat(widths, group))
    d = (rng.random((rows, n_groups)) * 0.05).astype(np.float16)
    d = (d.view(np.uint16) & np.uint16(fmt.SCALE_VALUE_MASK)).view(np.float16)
    m = (rng.standard_normal((rows, n_groups)) * 0.05).astype(np.float16)
    return fmt.pack(codes, d, m, widths, stype), stype


def write_seeds(target: Path = SEED_DIR) -> list[Path]:
    """The seed corpus, deterministic: the same bytes on every run."""
    import gguf

    fmt.register_gguf_types()
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens, scores, types = _vocab()

    def add_slim(writer: gguf.GGUFWriter, name: str, rows: int, cols: int, bits: int, group: int) -> None:
        packed, stype = _slim(rows, cols, bits, group, rng)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType(stype.type_id))

    model = target / MODEL_SEED
    w = gguf.GGUFWriter(model, arch="llama")
    w.add_name("slim2gguf fuzz seed")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(fmt.slim_type(3, 64).type_id)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", (rng.standard_normal((len(tokens), N_EMBD)) * 0.02).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    add_slim(w, "output.weight", len(tokens), N_EMBD, *OUTPUT_TYPE)
    head_dim = N_EMBD // N_HEAD
    out_rows = {"attn_q": N_EMBD, "attn_k": N_HEAD_KV * head_dim, "attn_v": N_HEAD_KV * head_dim,
                "attn_output": N_EMBD, "ffn_gate": N_FF, "ffn_up": N_FF, "ffn_down": N_EMBD}  # fmt: skip
    for i, kinds in enumerate(BLOCK_TYPES):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for kind, (bits, group) in kinds.items():
            add_slim(w, f"blk.{i}.{kind}.weight", out_rows[kind], N_FF if kind == "ffn_down" else N_EMBD, bits, group)
    _finish(w)

    lora = target / LORA_SEED
    w = gguf.GGUFWriter(lora, arch="llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(LORA_RANK))
    add_slim(w, "blk.0.attn_q.weight.lora_a", LORA_RANK, N_EMBD, 2, 32)
    add_slim(w, "blk.0.attn_q.weight.lora_b", N_EMBD, LORA_RANK, 2, 32)
    _finish(w)
    return [model, lora]


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- reading a file's layout -----------------------------------------------------------------


@dataclass
class Field:
    """Where one header value lives: ``fmt`` is its struct format, ``what`` names it."""

    offset: int
    fmt: str
    what: str
    section: str  # "header", "key" or "tensor_info"


@dataclass
class Tensor:
    name: str
    type_id: int
    dims: list[int]
    start: int  # absolute offset of its data
    nbytes: int


@dataclass
class Layout:
    fields: list[Field]
    tensors: list[Tensor]
    data_start: int


def layout(data: bytes) -> Layout:
    """The positions of every header field, key value and tensor info of a well-formed GGUF."""
    fields: list[Field] = []
    pos, section = 0, "header"

    def take(f: str, what: str) -> int:
        nonlocal pos
        fields.append(Field(pos, f, what, section))
        (value,) = struct.unpack_from("<" + f, data, pos)
        pos += struct.calcsize(f)
        return value

    def string(what: str) -> str:
        nonlocal pos
        n = take("Q", what + ".length")
        pos += n
        return data[pos - n : pos].decode()

    def value(vtype: int, what: str) -> None:
        nonlocal pos
        if vtype == _STRING:
            string(what)
        elif vtype == _ARRAY:
            etype, count = take("I", what + ".array_type"), take("Q", what + ".array_count")
            if etype in _SCALARS:
                pos += count * struct.calcsize(_SCALARS[etype])
            elif etype != _STRING:
                raise ValueError(f"{what}: arrays of arrays are not supported")
            for i in range(count if etype == _STRING else 0):
                if i < 4:  # the first strings' lengths are fields; the rest would swamp the others
                    string(f"{what}[{i}]")
                else:
                    (n,) = struct.unpack_from("<Q", data, pos)
                    pos += 8 + n
        else:
            take(_SCALARS[vtype], what)

    pos = 4  # magic
    take("I", "version")
    n_tensors, n_kv = take("Q", "n_tensors"), take("Q", "n_kv")
    alignment, section = 32, "key"
    for _ in range(n_kv):
        key = string("key")
        vtype = take("I", f"{key}.type")
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", data, pos)
        value(vtype, key)
    infos, section = [], "tensor_info"
    for _ in range(n_tensors):
        name = string("tensor.name")
        n_dims = take("I", f"{name}.n_dims")
        dims = [take("Q", f"{name}.dim{i}") for i in range(n_dims)]
        type_id = take("I", f"{name}.type")
        infos.append((name, type_id, dims, take("Q", f"{name}.offset")))
    data_start = -(-pos // alignment) * alignment
    tensors = [Tensor(n, t, d, data_start + o, _nbytes(t, d)) for n, t, d, o in infos]
    return Layout(fields, tensors, data_start)


def _nbytes(type_id: int, dims: list[int]) -> int:
    import gguf

    stype = fmt.type_from_id(type_id)
    rows = int(np.prod(dims[1:], dtype=np.int64))
    if stype is not None:
        return rows * stype.row_bytes(dims[0])
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    return rows * dims[0] // block * size


def rows_valid(data: bytes, lay: Layout, seed: bytes | None = None) -> bool:
    """Whether every SliM row passes ggml_validate_row_data: width codes ≤ 2, scale and
    offset finite, groups filling the row exactly. With the (valid) ``seed`` the file was
    mutated from, only the rows that differ from it are walked."""
    for t in lay.tensors:
        stype = fmt.type_from_id(t.type_id)
        if stype is None:
            continue
        row_bytes = stype.row_bytes(t.dims[0])
        rows = np.frombuffer(data, np.uint8, t.nbytes, t.start).reshape(-1, row_bytes)
        if seed is not None:
            rows = rows[(rows != np.frombuffer(seed, np.uint8, t.nbytes, t.start).reshape(-1, row_bytes)).any(axis=1)]
        for row in rows:
            try:
                widths = fmt.read_widths(row, stype, t.dims[0])
            except fmt.FormatError:
                return False
            offsets = fmt.group_offsets(widths, stype.group_size)
            d, m, _ = fmt.decode_header(row[offsets[:, None] + np.arange(fmt.HEADER_BYTES)])
            if not (np.isfinite(d).all() and np.isfinite(m).all()):
                return False
    return True


# --- mutations ---------------------------------------------------------------------------------


@dataclass
class Mutant:
    data: bytes
    what: str
    rows_only: bool  # only SliM row bytes changed: rows_valid decides whether the file is valid
    truncated: bool = False  # tensor data is missing: the file must be refused
    tensor: str | None = None  # the SliM tensor whose rows changed


def _put(buf: bytearray, field: Field, value: int) -> None:
    size = struct.calcsize(field.fmt)
    buf[field.offset : field.offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def _slim_group(data: bytes, lay: Layout, rng: random.Random, last_rows: bool = False) -> tuple[Tensor, int, int, fmt.SlimType]:
    """A random SliM tensor, one of its rows (one of the last 8 with ``last_rows``) and the
    absolute offset of one of that row's group headers, found by walking the row."""
    t = rng.choice([t for t in lay.tensors if fmt.type_from_id(t.type_id) is not None])
    stype = fmt.type_from_id(t.type_id)
    row_bytes = stype.row_bytes(t.dims[0])
    n_rows = t.nbytes // row_bytes
    row = rng.randrange(max(0, n_rows - 8), n_rows) if last_rows else rng.randrange(n_rows)
    start = t.start + row * row_bytes
    widths = fmt.read_widths(np.frombuffer(data, np.uint8, row_bytes, start), stype, t.dims[0])
    group = rng.randrange(widths.size)
    return t, start, start + int(fmt.group_offsets(widths, stype.group_size)[group]), stype


def mutate(seed: bytes, rng: random.Random) -> Mutant:
    """One mutation of a valid seed, chosen at random."""
    lay = layout(seed)
    buf = bytearray(seed)
    kind = rng.choice(("header", "key", "tensor_info", "tensor_info", "truncate", "bytes",
                       "width", "width", "fill", "scale", "scale", "payload"))  # fmt: skip
    if kind in ("header", "key", "tensor_info"):
        field = rng.choice([f for f in lay.fields if f.section == kind])
        (old,) = struct.unpack_from("<" + field.fmt, seed, field.offset)
        if field.fmt in "fd":
            new = rng.choice((float("nan"), float("inf"), -1.0, 0.0, 1e30))
            struct.pack_into("<" + field.fmt, buf, field.offset, new)
        else:
            new = rng.choice(_INTERESTING + (old + 1, old - 1, old + 1000, rng.randrange(1, 1 << 20)))
            if field.section == "tensor_info" and field.what.endswith(".type") and rng.random() < 0.5:
                new = rng.choice((rng.randrange(0, 42), rng.randrange(1000, 1010), rng.randrange(42, 1000)))
            _put(buf, field, new)
        return Mutant(bytes(buf), f"{field.what}: {old} -> {new}", rows_only=False)
    if kind == "truncate":
        end = max(t.start + t.nbytes for t in lay.tensors)
        cut = rng.randrange(0, end)
        return Mutant(seed[:cut], f"cut at {cut} of {len(seed)}", rows_only=False, truncated=True)
    if kind == "bytes":
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(buf))
            buf[at] = rng.randrange(256)
        return Mutant(bytes(buf), "random bytes", rows_only=False)
    t, row_start, header, stype = _slim_group(seed, lay, rng, last_rows=kind == "fill")
    if kind == "width":
        code = rng.randrange(4)
        d_bits = int.from_bytes(buf[header : header + 2], "little")
        d_bits = (d_bits & fmt.SCALE_VALUE_MASK) | ((code >> 1) << 15) | (code & 1)
        buf[header : header + 2] = d_bits.to_bytes(2, "little")
        what = f"{t.name}: width code {code} at byte {header - t.start}"
    elif kind == "fill":  # widen every group from this one on, so the row's groups fill it early
        end, pos = row_start + stype.row_bytes(t.dims[0]), header
        while pos + fmt.HEADER_BYTES <= end:
            d_bits = int.from_bytes(buf[pos : pos + 2], "little") | 0x8000
            d_bits &= ~1
            buf[pos : pos + 2] = d_bits.to_bytes(2, "little")
            pos += fmt.group_bytes(stype.bits + 1, stype.group_size)
        what = f"{t.name}: groups widened from byte {header - t.start} (a row of the last 8)"
    elif kind == "scale":  # fp16 infinities, NaNs, extremes, zeros or any bits
        part = rng.choice(("scale", "offset"))
        value = rng.choice((0x7C00, 0xFC00, 0x7E00, 0x7FFE, 0x7C02, 0x0000, 0x8000, 0x7BFE, rng.randrange(1 << 16)))
        at = header if part == "scale" else header + 2
        if part == "scale":  # its value bits only: the width code it shares the word with stays
            value = (int.from_bytes(buf[at : at + 2], "little") & 0x8001) | (value & fmt.SCALE_VALUE_MASK)
        buf[at : at + 2] = value.to_bytes(2, "little")
        what = f"{t.name}: {part} bits 0x{value:04x} at byte {header - t.start}"
    else:  # payload: bytes after the header, in this group or a later one
        for _ in range(rng.randint(1, 16)):
            at = rng.randrange(header + fmt.HEADER_BYTES, t.start + t.nbytes)
            buf[at] = rng.randrange(256)
        what = f"{t.name}: bytes from byte {header - t.start}"
    return Mutant(bytes(buf), what, rows_only=True, tensor=t.name)


if __name__ == "__main__":
    for path in write_seeds(Path(sys.argv[1]) if len(sys.argv) > 1 else SEED_DIR):
        print(path, path.stat().st_size, "bytes")
