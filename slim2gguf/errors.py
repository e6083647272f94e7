"""Other libraries' error messages, fitted to slim2gguf's one-line errors."""

from __future__ import annotations

import os
import re


def one_line(err: BaseException) -> str:
    """``err``'s message with its line breaks and runs of spaces folded (transformers and
    safetensors write several lines), or its type's name when it has none."""
    return " ".join(str(err).split()) or type(err).__name__


def reason(err: BaseException) -> str:
    """Why a file could not be read or written, without its path (the caller names it): an
    OSError's own words ("Permission denied"), the system's words that safetensors wraps in
    "I/O error: … (os error N)", else ``one_line``."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(err))
    return found[1] if found else one_line(err)


def check_readable(path: str | os.PathLike) -> None:
    """Open ``path`` once: an OSError then says why it cannot be read, where safetensors calls
    a file it may not read "No such file or directory"."""
    with open(path, "rb"):
        pass
