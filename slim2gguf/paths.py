"""Where slim2gguf keeps what it downloads or builds once (outside any repository)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SLIM2GGUF_CACHE``, else ``~/.cache/slim2gguf``."""
    root = os.environ.get("SLIM2GGUF_CACHE") or Path.home() / ".cache" / "slim2gguf"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
