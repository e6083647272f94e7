"""Other libraries' error messages, fitted to slim2gguf's one-line errors."""

from __future__ import annotations


def one_line(err: BaseException) -> str:
    """``err``'s message with its line breaks and runs of spaces folded (transformers and
    safetensors write several lines), or its type's name when it has none."""
    return " ".join(str(err).split()) or type(err).__name__
