"""The frontier harness end to end: ``scripts/bench_frontier.py --quick`` makes real files with
patched llama.cpp's llama-quantize (with llama-imatrix) and ``slim2gguf convert``, measures
them with llama-perplexity, and a rerun reuses everything it made (and, with --speed,
llama-benches every file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slim2gguf import llamacpp

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_frontier.py"
SHARED = ROOT.parent / "shared" / "data"
FIELDS = {"name", "family", "type", "bpw_file", "bpw_blocks", "ppl", "kld_mean", "kld_p99", "same_top_pct"}
# bits per weight of each type's ffn_down tensors: ggml's block sizes, and SliM's g64 header
BLOCK_BPW = {"F16": 16.0, "IQ2_XS": 2.3125, "Q3_K": 3.4375, "IQ4_NL": 4.5, "slim2-g64": 2.5}


def test_quick_frontier_measures_both_families_and_resumes(tmp_path):
    for needed in (SHARED / "wikitext-2-raw" / "wiki.test.raw", SHARED / "wikitext-2" / "valid.txt"):
        if not needed.exists():
            pytest.skip(f"{needed} is not present (WikiText-2 beside the project)")
    llamacpp.build()
    work, out = tmp_path / "work", tmp_path / "records.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--work", str(work), "--json", str(out), "--plot", str(tmp_path / "p.png")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    records = json.loads(out.read_text())
    by_name = {r["name"]: r for r in records}
    assert set(by_name) == set(BLOCK_BPW)
    for name, r in by_name.items():
        assert FIELDS <= set(r), name
        assert r["family"] == ("slim2gguf" if name.startswith("slim") else "llama.cpp")
        assert r["bpw_blocks"] == pytest.approx(BLOCK_BPW[name], abs=1e-9), name
        assert r["bpw_blocks"] <= r["bpw_file"] <= 16.01  # every other tensor F16, norms F32
        assert 1 < r["ppl"] < 1e4
    f16 = by_name.pop("F16")
    assert (f16["kld_mean"], f16["kld_p99"], f16["same_top_pct"]) == (0.0, 0.0, 100.0)
    for name, r in by_name.items():
        assert 0 < r["kld_mean"] < r["kld_p99"], name
        assert 0 < r["same_top_pct"] < 100, name
    ours = by_name["slim2-g64"]
    assert ours["type"] == "slim2-g64" and ours["quant_s"] > 0 and ours["peak_rss_mib"] > 100
    assert by_name["IQ4_NL"]["kld_mean"] < by_name["IQ2_XS"]["kld_mean"]  # more bits, less error
    assert (tmp_path / "p.png").stat().st_size > 10_000

    made = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.suffix in (".gguf", ".kld", ".json")}
    again = subprocess.run([*cmd, "--speed", "1"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    timed = json.loads(out.read_text())
    assert [{k: v for k, v in r.items() if not k.endswith("_ts")} for r in timed] == records
    assert all(r["pp512_ts"] > 0 and r["tg128_ts"] > 0 for r in timed)  # llama-bench ran every file, side by side
    assert {p: p.stat().st_mtime_ns for p in made} == made  # nothing was made or measured again
    assert "llama-quantize" not in again.stderr and "perplexity" not in again.stderr
