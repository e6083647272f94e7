"""Write-then-rename helpers, so an interrupted run never leaves a half-written output."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success.

    On any exception (Ctrl-C included) the temporary file or folder is removed; one that a
    killed run (SIGKILL, power loss) left behind for the same target is removed when the
    target is written again. The temporary name carries the writer's process id, so a
    run writing the same target at the same time keeps its file: the one whose rename
    comes last wins, whole.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if not _writer_alive(stale, target.name):
            _remove(stale)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        _remove(tmp_path)
        raise


@contextlib.contextmanager
def file_locked(lock: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the (empty) file ``lock``, made where missing and left for the
    next run: runs that make the same thing wait for each other, and the later one finds it
    made, where both did the work and the later one's rename failed on the folder the first had
    put there. Opened for writing, as an exclusive lock over NFS needs. ``on_wait`` is called
    once where another run holds it (to say why nothing moves)."""
    with open(lock, "a") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no protection against a concurrent run
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _writer_alive(temp: Path, name: str) -> bool:
    """Whether the process that named ``temp`` (``.NAME.PID-XXXX.tmp``) still runs."""
    pid = temp.name[len(name) + 2 :].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
