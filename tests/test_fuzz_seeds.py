"""The loader fuzzer's seeds and mutator (tests/gguf_mutator.py), checked without llama.cpp."""

from __future__ import annotations

import random

import gguf
import numpy as np
from gguf_mutator import LORA_SEED, MODEL_SEED, SEED_DIR, layout, mutate, rows_valid, write_seeds

from slim2gguf import format as fmt


def test_committed_seeds_are_what_the_generator_writes(tmp_path):
    for path in write_seeds(tmp_path):
        assert path.read_bytes() == (SEED_DIR / path.name).read_bytes(), "regenerate with: python tests/gguf_mutator.py"


def test_layout_finds_every_tensor_where_gguf_py_does():
    for name in (MODEL_SEED, LORA_SEED):
        data = (SEED_DIR / name).read_bytes()
        lay = layout(data)
        reader = gguf.GGUFReader(SEED_DIR / name)
        assert [(t.name, t.start, t.nbytes) for t in lay.tensors] == [
            (t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors
        ]
        assert rows_valid(data, lay)
        assert {f.section for f in lay.fields} == {"header", "key", "tensor_info"}


def test_rows_valid_follows_the_format_rules():
    data = bytearray((SEED_DIR / MODEL_SEED).read_bytes())
    lay = layout(bytes(data))
    t = next(t for t in lay.tensors if fmt.type_from_id(t.type_id) is not None)
    word = int.from_bytes(data[t.start : t.start + 2], "little")  # the first group's scale and width code
    cases = (
        (0, word | 0x8001, False),  # width code 3
        (0, (word & 0x8001) | 0x7C00, False),  # scale inf
        (2, 0x7E00, False),  # offset NaN
        (2, 0xBC00, True),  # offset -1
        (4, 0xFFFF, True),  # payload
    )
    for offset, value, valid in cases:
        mutated = data.copy()
        mutated[t.start + offset : t.start + offset + 2] = value.to_bytes(2, "little")
        assert rows_valid(bytes(mutated), lay) == valid, (offset, hex(value))


def test_mutations_are_deterministic_and_cover_every_kind():
    seed = (SEED_DIR / MODEL_SEED).read_bytes()
    assert mutate(seed, random.Random(7)).data == mutate(seed, random.Random(7)).data
    rng = random.Random(0)
    mutants = [mutate(seed, rng) for _ in range(400)]
    kinds = {m.what.split(":")[0].split(".")[-1] if not m.rows_only else m.what.split(": ")[1].split()[0] for m in mutants}
    assert {"width", "scale", "offset", "bytes", "groups"} <= kinds, kinds
    rows_only = [m for m in mutants if m.rows_only]
    verdicts = [rows_valid(m.data, layout(m.data), seed) for m in rows_only]
    assert verdicts == [rows_valid(m.data, layout(m.data)) for m in rows_only[:40]] + verdicts[40:]
    assert 0.1 < np.mean(verdicts) < 0.9  # both outcomes are exercised
    assert any(m.truncated for m in mutants) and all(len(m.data) < len(seed) for m in mutants if m.truncated)
