"""Other libraries' error messages, fitted to slim2gguf's one-line errors."""

from __future__ import annotations

import os


def one_line(err: BaseException) -> str:
    """``err``'s message with its line breaks and runs of spaces folded (transformers and
    safetensors write several lines), or its type's name when it has none."""
    return " ".join(str(err).split()) or type(err).__name__


def one_line_os(err: BaseException) -> str:
    """An OSError's reason alone ("Permission denied"; the caller names the path), else ``one_line``."""
    return err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)


def check_readable(path: str | os.PathLike) -> None:
    """Open ``path`` once: an OSError then says why it cannot be read, where safetensors calls
    a file it may not read "No such file or directory"."""
    with open(path, "rb"):
        pass
