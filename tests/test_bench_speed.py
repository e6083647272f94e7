"""scripts/bench_speed.py on a tiny block: it times the pipeline's own block work for every method."""

from __future__ import annotations

import pytest
from conftest import imported_script


@pytest.fixture(scope="module")
def bench():
    with imported_script("bench_speed") as module:
        yield module


def test_times_every_method_on_one_block(bench, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", ("llama", 128, 256, 4, 2))
    rows = bench.time_block("tiny", 1024, ["rtn", "gptq", "slim"], 3, [])
    assert [r["method"] for r in rows] == ["rtn", "gptq", "slim"]
    assert all(r["block_s"] >= 0 and r["forward_s"] >= 0 and r["tokens"] == 1024 for r in rows)  # seconds, 2 decimals
    assert {r["params"] for r in rows} == {2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128}  # q, o; k, v (2 of 4 heads); MLP


def test_times_stock_types_per_method(bench, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", ("llama", 256, 512, 4, 2))
    rows = bench.time_block("tiny", 1024, ["slim"], 3, ["iq3_s", "q4_0"])
    assert [(r["method"], r["native"]) for r in rows] == [("slim", "iq3_s"), ("slim", "q4_0")]
    assert all("bits" not in r and r["block_s"] > 0 for r in rows)
