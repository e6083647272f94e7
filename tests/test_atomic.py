"""Write-then-rename: all or nothing, leftovers of killed runs swept, live writers spared."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slim2gguf.atomic import atomic_path, file_locked, write_bytes_atomic


def test_success_renames_and_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.gguf"
    write_bytes_atomic(target, b"ok")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_leftovers_of_dead_writers_are_swept_live_ones_kept(tmp_path):
    target = tmp_path / "out.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed = tmp_path / f".out.gguf.{int(dead.stdout)}-abc.tmp"
        running = tmp_path / f".out.gguf.{live.pid}-def.tmp"
        unnamed = tmp_path / ".out.gguf.xyz.tmp"  # an older slim2gguf's name: no process id
        other = tmp_path / f".other.gguf.{int(dead.stdout)}-abc.tmp"
        for path in (killed, running, unnamed, other):
            path.write_bytes(b"partial")
        write_bytes_atomic(target, b"new")
        assert target.read_bytes() == b"new"
        assert not killed.exists() and not unnamed.exists()
        assert running.exists() and other.exists()
    finally:
        live.kill()
        live.wait()


def test_a_held_lock_makes_the_next_run_wait(tmp_path):
    """Two runs importing the same GGUF file both did the work, and the later one's rename
    failed on the folder the first had put there ("Directory not empty")."""
    import threading

    lock = tmp_path / ".model.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from slim2gguf.atomic import file_locked\n"
         f"with file_locked(Path({str(lock)!r})):\n    print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        waiting, got = threading.Event(), threading.Event()

        def take() -> None:
            with file_locked(lock, on_wait=waiting.set):
                got.set()

        taker = threading.Thread(target=take)
        taker.start()
        assert waiting.wait(60) and not got.is_set()  # told to wait, and waiting
        holder.stdin.write("\n")  # the holder lets go
        holder.stdin.flush()
        taker.join(60)
        assert got.is_set()
        said: list[str] = []
        with file_locked(lock, on_wait=lambda: said.append("waiting")):  # free: no wait
            pass
        assert said == [] and [p.name for p in tmp_path.iterdir()] == [".model.lock"]
    finally:
        holder.kill()
        holder.wait()
