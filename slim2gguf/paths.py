"""Where slim2gguf keeps what it downloads or builds once (outside any repository)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE = Path(__file__).parent


def cache_dir() -> Path:
    """``$SLIM2GGUF_CACHE``, else ``~/.cache/slim2gguf``."""
    root = os.environ.get("SLIM2GGUF_CACHE") or Path.home() / ".cache" / "slim2gguf"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_digest() -> str:
    """SHA-256 of slim2gguf's source files: what cached results made by this code are keyed by."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
