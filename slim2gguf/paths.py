"""Where slim2gguf keeps what it downloads or builds once (outside any repository)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

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


def model_files(model_dir: Path) -> list[list[Any]]:
    """Name, size and modification time of each file of a model folder: what tells a result
    cached from its weights, config and tokenizer that they are still the ones it was made
    from (a rewrite that keeps all three is not seen; hashing gigabytes of weights would be)."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def model_fingerprint(model_dir: Path) -> str:
    """A short digest of ``model_files``, kept in a checkpoint's settings."""
    return hashlib.sha256(json.dumps(model_files(model_dir)).encode()).hexdigest()[:16]
