"""Run the patched llama.cpp tools on a slim2gguf file from Python.

Stock llama.cpp cannot load SliM types, so runs go through the patched build
(``llamacpp.binary`` builds it on first use), which also runs ``--format native``
files; a user's own unpatched build ($SLIM2GGUF_LLAMA_CPP_BIN) is taken for a file
that holds stock types only. A failing tool's own log is the usual diagnosis, so errors
carry the tail of its stderr; a file gguf-py cannot read is named as such instead.

llama.cpp logs from a thread of its own and does not wait for it at exit (its logger is
leaked on purpose), so a tool that fails at once often loses the last lines of its log,
the ones that say why, or all of it: here 1 run in 6 to 4 in 5 on a file it refuses, idle
to busy CPU. The patched build drains its log at exit (patches/0007); for a build without
that patch a quick failure is run again, a few times, and the longest log kept.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import reason
from .inspect_gguf import GGUFFileError, open_gguf
from .llamacpp import binary, drains_its_log

LOG_TAIL_LINES = 25
QUICK_FAILURE_S = 2.0  # a failure this fast (a file refused while loading) is run again for its log
LOG_TRIES = 10  # runs of a quick failure at most, where the build lacks patches/0007 (1 in 6 to 4 in 5 lose the reason)
GGUF_MAGIC = b"GGUF"  # every GGUF file's first bytes, whatever its byte order
END_OF_TEXT = " [end of text]\n"  # what llama-completion prints when the model ends the text


class LlamaToolError(RuntimeError):
    """A patched llama.cpp tool failed or said something unexpected; the message ends with its log."""


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def holds_slim_types(gguf_path: str | os.PathLike) -> bool:
    """Whether a file needs the patched build: it has SliM tensors, or cannot be read."""
    import gguf

    from . import format as fmt

    fmt.register_gguf_types()
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception:  # any malformed file: let the patched build's checks speak
        return True
    return any(fmt.type_from_id(t.tensor_type) is not None for t in reader.tensors)


def run_tool(
    name: str, args: Sequence[str | os.PathLike | int], gguf_path: str | os.PathLike | None = None
) -> subprocess.CompletedProcess[str]:
    """Run tool ``name`` with ``args`` (on the file ``gguf_path``) and return its output;
    stdin is closed, so a tool that falls into an interactive mode ends instead of
    waiting for input."""
    stock_ok = (lambda: not holds_slim_types(gguf_path)) if gguf_path is not None else None
    tool = binary(name, stock_ok=stock_ok)
    cmd = [str(tool), *(str(a) for a in args)]
    result, took = _run(cmd)
    for _ in range(LOG_TRIES - 1):
        if result.returncode == 0 or took > QUICK_FAILURE_S or (result.returncode > 0 and drains_its_log(tool)):  # a crash (a signal) skips the wait at exit
            break
        again, took = _run(cmd)
        if again.returncode == result.returncode and len(again.stderr) > len(result.stderr):
            result = again
    if result.returncode != 0:
        failed = f"{name} failed (exit code {result.returncode})"
        if gguf_path is not None:
            try:
                open_gguf(gguf_path)
            except GGUFFileError as err:
                raise LlamaToolError(f"{failed}: {err}") from None
        raise LlamaToolError(f"{failed}:\n{log_tail(result.stderr) or 'it printed nothing'}")
    return result


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """One run of a tool, and the seconds it took."""
    started = time.monotonic()
    try:
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8", errors="replace"
        )
    except OSError as err:  # a tool of the user's build that cannot run (no execute bit, another CPU's binary)
        raise LlamaToolError(f"{cmd[0]} cannot run: {reason(err)}") from None
    return result, time.monotonic() - started


def check_gguf_path(gguf_path: str | os.PathLike) -> Path:
    """The path, or before any tool is built or started a FileNotFoundError (no file) or a
    GGUFFileError (a file that does not begin with GGUF's magic), so such a mistake reads as
    one line rather than as a llama.cpp log."""
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GGUFFileError(f"{path} is not a GGUF file: it begins with {magic!r}, not {GGUF_MAGIC!r}")
    return path


def run_completion(
    gguf_path: str | os.PathLike,
    prompt: str,
    n_predict: int = 64,
    threads: int | None = None,
    seed: int = 0,
    extra_args: Sequence[str] = (),
) -> str:
    """The text patched ``llama-completion`` generates after ``prompt`` (prompt not included).

    Greedy (``--temp 0``), so a file always gives the same text; conversation mode is
    off (models with a chat template would otherwise wait for a user), the prompt is
    taken literally (no escape processing). ``extra_args`` go last and override.
    """
    path = check_gguf_path(gguf_path)
    args: list[str | os.PathLike | int] = [
        "-m", path, "-p", prompt, "-n", n_predict, "--seed", seed, "--temp", 0,
        "-no-cnv", "--no-display-prompt", "--no-escape", "--simple-io",
    ]  # fmt: skip
    if threads:
        args += ["-t", threads]
    out = run_tool("llama-completion", [*args, *extra_args], path).stdout
    return out.removesuffix("\n\n").removesuffix(END_OF_TEXT)
