"""slim2gguf's one-line messages: a styled label, then the text as it is (a path or a model's
name is never read as rich markup, and a long line is not broken at the terminal's width)."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

ERROR = Text("error:", style="bold red")
WARNING = Text("warning:", style="bold yellow")
INTERRUPTED = Text("interrupted:", style="yellow")


def say(console: Console, label: Text, message: str) -> None:
    """``label message`` on one line."""
    console.print(label, message, soft_wrap=True, highlight=False)
