"""Fuzzing the patched llama.cpp's loading of SliM files, in a sanitizer build (issue 18).

A GGUF file comes from strangers: llama.cpp must refuse a malformed one with a message and
never read out of bounds. ``llama-slim-load`` (patches/0005), built with AddressSanitizer and
UBSan (the "sanitize" variant), loads thousands of mutated files in one process: each tensor
read and validated as ``llama-slim-dump validate`` does, then the model loaded as llama.cpp
loads it, mapped with load-time repacking, read into memory with and without repacking (the
LoRA seed is loaded as an adapter instead). The seeds and the mutator are in
tests/gguf_mutator.py and tests/data/fuzz-seeds.

What must hold for every file: no sanitizer report, no crash, each refusal carries a message,
a truncated file is refused everywhere, and where only SliM row bytes changed, llama.cpp's
verdict is the format's (tests/gguf_mutator.rows_valid): accepted if and only if every row is
valid.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from build_variants import sanitizer_env, sanitizer_report, skip_reason
from gguf_mutator import LORA_SEED, MODEL_SEED, SEED_DIR, Mutant, layout, mutate, rows_valid

from slim2gguf import format as fmt
from slim2gguf import llamacpp

pytestmark = pytest.mark.e2e

MODEL_STAGES = ("validate", "mmap", "read-repack", "read-plain")
# SLIM2GGUF_FUZZ_FILES: more files for a longer campaign (the test's seed stays fixed)
FUZZ_FILES = int(os.environ.get("SLIM2GGUF_FUZZ_FILES", "10000"))
BATCH = 500  # files written, loaded and deleted together


def _sanitize_tool(name: str) -> Path:
    reason = skip_reason("sanitize")
    if reason:
        pytest.skip(reason)
    return llamacpp.binary(name, cpu="sanitize")


@pytest.fixture(scope="module")
def load_tool() -> Path:
    return _sanitize_tool(llamacpp.LOAD_TOOL)


@pytest.fixture(scope="module")
def dump_tool() -> Path:
    return _sanitize_tool(llamacpp.DUMP_TOOL)


@dataclass
class Verdict:
    ok: bool
    message: str


def run_loader(tool: Path, files: list[Path]) -> dict[Path, dict[str, Verdict]]:
    """Each file's verdict per stage; fails on a sanitizer report or a crash, naming the file."""
    result = subprocess.run(
        [tool, "--base", SEED_DIR / MODEL_SEED, "-"],
        input="\n".join(map(str, files)) + "\n",
        capture_output=True,
        text=True,
        errors="replace",
        env=sanitizer_env(),
        timeout=1800,
    )
    started = [line[5:] for line in result.stdout.splitlines() if line.startswith("FILE ")]
    report = sanitizer_report(result.stderr)
    if result.returncode != 0 or report:
        last = started[-1] if started else "(none)"
        raise AssertionError(
            f"{llamacpp.LOAD_TOOL} exited {result.returncode} ({report or 'no sanitizer report'}) while loading {last}\n"
            + result.stderr[-6000:]
        )
    verdicts: dict[Path, dict[str, Verdict]] = {}
    for line in result.stdout.splitlines():
        if not line.startswith("FILE "):
            path, stage, status, *message = line.split("\t")
            verdicts.setdefault(Path(path), {})[stage] = Verdict(status == "ok", message[0] if message else "")
    return verdicts


def test_the_seeds_load_and_the_slim_lora_adapter_is_refused(load_tool):
    verdicts = run_loader(load_tool, [SEED_DIR / MODEL_SEED, SEED_DIR / LORA_SEED])
    model, lora = verdicts[SEED_DIR / MODEL_SEED], verdicts[SEED_DIR / LORA_SEED]
    assert set(model) == set(MODEL_STAGES) and all(v.ok for v in model.values()), model
    # the SliM tensors of 8k rows are interleaved where llama.cpp repacks (the out-of-bounds risk)
    lay = layout((SEED_DIR / MODEL_SEED).read_bytes())
    x8 = sum(1 for t in lay.tensors if fmt.type_from_id(t.type_id) and t.dims[1] % 8 == 0)
    assert x8 >= 8 and [model[s].message for s in MODEL_STAGES] == ["0 interleaved", f"{x8} interleaved", f"{x8} interleaved", "0 interleaved"]
    assert lora["validate"].ok
    assert not lora["lora"].ok and "SliM-LLM types are not supported in adapters" in lora["lora"].message


def _check(mutant: Mutant, seed: bytes, stages: dict[str, Verdict]) -> list[str]:
    """What is wrong with llama.cpp's verdicts on one mutant (nothing: an empty list)."""
    problems = [f"{stage} refused it without a message" for stage, v in stages.items() if not v.ok and not v.message]
    expected = {"validate", "lora"} if "lora" in stages else set(MODEL_STAGES)  # an adapter if it still says so
    if set(stages) != expected:
        problems.append(f"stages {sorted(stages)}, expected {sorted(expected)}")
    if mutant.truncated:
        problems += [f"{stage} accepted a truncated file" for stage, v in stages.items() if v.ok]
    if mutant.rows_only:  # the header is the seed's: the rows alone decide (a SliM adapter is always refused)
        valid = rows_valid(mutant.data, layout(mutant.data), seed)
        for stage, v in stages.items():
            if v.ok != (valid and stage != "lora"):
                problems.append(f"{stage} {'accepted' if v.ok else 'refused'} it; its rows are {'' if valid else 'in'}valid ({v.message})")
    return problems


def test_mutated_slim_files_are_refused_with_a_message_never_read_out_of_bounds(load_tool, tmp_path):
    seeds = {name: (SEED_DIR / name).read_bytes() for name in (MODEL_SEED, LORA_SEED)}
    rng = random.Random(18)
    failures: list[str] = []
    counts = {"accepted": 0, "refused": 0, "interleaved": 0}
    for first in range(0, FUZZ_FILES, BATCH):
        batch: dict[Path, tuple[Mutant, bytes]] = {}
        for i in range(first, min(first + BATCH, FUZZ_FILES)):
            seed = seeds[LORA_SEED if rng.random() < 0.05 else MODEL_SEED]
            mutant = mutate(seed, rng)
            path = tmp_path / f"{i:05d}.gguf"
            path.write_bytes(mutant.data)
            batch[path] = (mutant, seed)
        verdicts = run_loader(load_tool, list(batch))
        for path, (mutant, seed) in batch.items():
            stages = verdicts.get(path, {})
            counts["accepted" if stages and all(v.ok for v in stages.values()) else "refused"] += 1
            counts["interleaved"] += stages.get("read-repack", Verdict(False, "")).message not in ("", "0 interleaved")
            failures += [f"{path.name} ({mutant.what}): {p}" for p in _check(mutant, seed, stages)]
            path.unlink()
    assert not failures, f"{len(failures)} problems, e.g.\n" + "\n".join(failures[:30])
    # the campaign must exercise both outcomes and load-time repacking, or it tests little
    assert counts["accepted"] > FUZZ_FILES // 20 and counts["refused"] > FUZZ_FILES // 2, counts
    assert counts["interleaved"] >= counts["accepted"], counts


def test_dump_tool_validate_gives_the_formats_verdict_on_mutated_rows(dump_tool, tmp_path):
    """``llama-slim-dump validate`` (the check every kernel test makes first), in the same build."""
    seed = (SEED_DIR / MODEL_SEED).read_bytes()
    rng = random.Random(180)
    path, checked, refused = tmp_path / "mutant.gguf", 0, 0
    while checked < 200:
        mutant = mutate(seed, rng)
        if not mutant.rows_only:
            continue
        path.write_bytes(mutant.data)
        r = subprocess.run([dump_tool, path, "validate", mutant.tensor], capture_output=True, text=True, env=sanitizer_env(), timeout=60)
        assert sanitizer_report(r.stderr) is None, f"{mutant.what}:\n{r.stderr[-6000:]}"
        valid = rows_valid(mutant.data, layout(mutant.data), seed)
        assert r.returncode == (0 if valid else 2), f"{mutant.what}: exit {r.returncode}, rows valid: {valid}\n{r.stderr}"
        assert valid or "is invalid" in r.stderr, r.stderr
        checked, refused = checked + 1, refused + (not valid)
    assert 20 < refused < 180, refused

