"""The wheel alone: ``python -m build`` makes it, a fresh virtual environment holds only it
(and its dependencies from the package index), and from a folder outside this checkout
it reports the same patch series, finds its patched llama.cpp build (the one the other
end-to-end tests use: same patches, same key), converts the demo model and runs the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slim2gguf import llamacpp

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str | os.PathLike], cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SLIM2GGUF_PATCH_DIR", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv with torch (as setup.sh pins it) and the freshly built wheel; nothing editable."""
    root = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", root / "dist", ROOT], cwd=root)
    (wheel,) = (root / "dist").glob("slim2gguf-*.whl")
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", root / "venv"], cwd=root)
    pip = [root / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet"]
    run([*pip, os.environ.get("TORCH_SPEC", "torch==2.13.0")], cwd=root)
    run([*pip, wheel], cwd=root)
    return root / "venv" / "bin"


def test_the_installed_wheel_builds_converts_and_runs(wheel_venv, tmp_path):
    bin_dir = llamacpp.build()  # the checkout's build, so the wheel's must be a cache hit
    cli = wheel_venv / "slim2gguf"
    located = run([wheel_venv / "python", "-c", "import slim2gguf, slim2gguf.llamacpp as l; print(slim2gguf.__file__, l.PATCH_DIR)"], tmp_path)
    package, patches = located.stdout.split()
    assert ROOT not in Path(package).parents and Path(patches) == Path(package).parent / "patches"
    version = run([cli, "--version"], tmp_path).stdout
    assert llamacpp.patch_series_hash() in version and llamacpp.PINNED_COMMIT in version
    built = run([cli, "llama-cpp", "build"], tmp_path, timeout=3000)
    assert str(bin_dir) in built.stdout.replace("\n", "")  # same patches and options: the same cached build
    out = tmp_path / "demo-rtn4.gguf"
    run([cli, "convert", "smollm2-135m", "-o", out, "--method", "rtn", "--bits", "4", "--group-size", "64"], tmp_path)
    completion = run([cli, "run", out, "-p", "The capital of France is", "-n", "12"], tmp_path).stdout
    assert completion.startswith("The capital of France is") and len(completion) > len("The capital of France is") + 4
