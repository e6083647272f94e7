"""Nothing lost, nothing half-written: real `slim2gguf convert` runs (calibration, SliM
quantization, packing, the GGUF export in its child process) killed with SIGINT or SIGKILL at
random moments, then rerun with the same command. The rerun must finish with a file
byte-identical to an uninterrupted run's, and at no moment may the output path hold anything
but that file; a temporary file that SIGKILL left behind is gone after the rerun.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

KILLS = 6  # moments per run, alternating SIGINT and SIGKILL
SEED = 20261130


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny LLaMA (4 blocks) with the demo model's tokenizer, which llama.cpp's converter accepts."""
    from export_helpers import tiny_model_dir

    from slim2gguf.named_models import demo_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("interrupt") / "llama", "LlamaForCausalLM", demo_model_dir(), num_hidden_layers=4)


def convert(model: Path, text: Path, folder: Path) -> list[str]:
    folder.mkdir(exist_ok=True)
    return [sys.executable, "-m", "slim2gguf", "convert", str(model), "-o", str(folder / "out.gguf"), "--bits", "3",
            "--group-size", "32", "--calib", str(text), "--nsamples", "8", "--seqlen", "64", "--seed", "3",
            "--checkpoint", str(folder / "ckpt")]  # fmt: skip


def finish(cmd: list[str]) -> float:
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return time.monotonic() - t0


def test_killed_runs_resume_to_the_same_bytes(model, tiny_text, tmp_path):
    reference = tmp_path / "reference"
    seconds = finish(convert(model, tiny_text, reference))
    expected = (reference / "out.gguf").read_bytes()

    rng = random.Random(SEED)
    for trial in range(KILLS):
        folder = tmp_path / f"trial{trial}"
        sig = signal.SIGINT if trial % 2 == 0 else signal.SIGKILL
        cmd = convert(model, tiny_text, folder)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(rng.uniform(0.05, 1.0) * seconds)
        os.killpg(proc.pid, sig)  # the run and its export child, as Ctrl-C or an OOM kill would
        _, err = proc.communicate(timeout=300)
        out = folder / "out.gguf"
        where = f"trial {trial} ({sig.name}, exit {proc.returncode})"
        if out.exists():  # the kill came after the rename
            assert out.read_bytes() == expected, f"{where}: a different file at the output path"
        if sig == signal.SIGINT and proc.returncode not in (0, None):
            assert "Traceback" not in err, f"{where}:\n{err[-2000:]}"
        finish(cmd)
        assert out.read_bytes() == expected, f"{where}: the rerun wrote different bytes"
        leftovers = [str(p.relative_to(folder)) for p in folder.rglob("*.tmp")]
        assert not leftovers, f"{where}: {leftovers}"
