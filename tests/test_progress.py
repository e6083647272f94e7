"""Progress off a terminal: throttled plain lines, so a redirected long run shows it is alive."""

import io
import re

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, TextColumn

from slim2gguf.progress import Progress

COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())


def run(console: Console, interval: float) -> list[str]:
    """The plain lines the bar printed, without their elapsed seconds."""
    with Progress(*COLUMNS, console=console, interval=interval) as bar:
        task = bar.add_task("blocks", total=3)
        for i in range(3):
            bar.update(task, description=f"block {i}")
            bar.advance(task)
        bar.update(task, description="done")  # after the finish: no second final line
    return [m[1] for m in re.finditer(r"^(.*), \d+ s$", console.file.getvalue(), re.M)]


def test_lines_when_redirected():
    lines = run(Console(file=io.StringIO(), width=80), interval=0)
    assert lines == ["block 0: 0/3", "block 0: 1/3", "block 1: 1/3", "block 1: 2/3", "block 2: 2/3", "block 2: 3/3"]


def test_throttled_to_the_interval_but_the_finish_is_always_said():
    lines = run(Console(file=io.StringIO(), width=80), interval=3600)
    assert lines == ["block 2: 3/3"]


def test_no_lines_on_a_terminal_or_when_disabled():
    terminal = Console(file=io.StringIO(), width=80, force_terminal=True, force_interactive=True)
    assert run(terminal, interval=0) == []
    quiet = Console(file=io.StringIO(), width=80)
    with Progress(*COLUMNS, console=quiet, interval=0, disable=True) as bar:
        bar.advance(bar.add_task("blocks", total=1))
    assert quiet.file.getvalue() == ""


def test_bytes_as_sizes_when_the_bar_counts_bytes():
    """A download's line reads "318.8 MB/1.1 GB", not "3.18767e+08/1.11732e+09"."""
    console = Console(file=io.StringIO(), width=80)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console, interval=0) as bar:
        task = bar.add_task("fetching", total=1_117_320_768)
        bar.advance(task, 318_767_104)
    assert re.search(r"^fetching: 318\.8 MB/1\.1 GB, \d+ s$", console.file.getvalue(), re.M), console.file.getvalue()
