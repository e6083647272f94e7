"""Progress bars that keep reporting when the output is not a terminal.

Rich draws a live bar only on an interactive terminal; redirected to a file (nohup, a CI
log) it prints the bars once, when they stop, so an hour-long conversion looks hung. Off
a terminal this Progress also prints a plain line per task at most every `interval`
seconds and once when the task finishes (in bytes, as "318.8 MB/1.1 GB", when a
DownloadColumn shows that the task counts bytes).
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from rich import filesize
from rich import progress as rich_progress
from rich.progress import TaskID

LINE_INTERVAL_S = 30.0


class Progress(rich_progress.Progress):
    """rich's Progress, plus throttled plain lines when the console is not interactive."""

    def __init__(self, *columns: Any, interval: float = LINE_INTERVAL_S, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._lines = not self.disable and not self.console.is_interactive
        self._interval = interval
        self._said: dict[TaskID, float] = {}
        self._done: set[TaskID] = set()
        self._bytes = any(isinstance(c, rich_progress.DownloadColumn) for c in columns)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def _say(self, task_id: TaskID) -> None:
        if not self._lines or task_id in self._done:
            return
        task, now = self._tasks[task_id], monotonic()
        if task.finished:
            self._done.add(task_id)
        elif now - self._said.get(task_id, task.start_time or now) < self._interval:
            return
        self._said[task_id] = now
        done = self._count(task.completed)
        if task.total is not None:
            done += f"/{self._count(task.total)}"
        self.console.print(f"{task.description}: {done}, {task.elapsed or 0:.0f} s", highlight=False, markup=False)

    def _count(self, n: float) -> str:
        return filesize.decimal(int(n)) if self._bytes else f"{n:g}"
