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


MODEL_FILES = ("*.safetensors", "*.bin", "*.json", "*.model", "*.tiktoken", "merges.txt", "vocab.txt")  # weights, configs, tokenizers
IMPORT_RECORD = "slim2gguf-import.json"  # in a folder imported from a GGUF file: the file, the import's version, the files made


def model_files(model_dir: Path) -> list[list[Any]]:
    """Name, size and modification time of a model folder's weights, configs and tokenizer
    files: what tells a result cached from them that they are still the ones it was made
    from (a rewrite that keeps all three is not seen; hashing gigabytes of weights would be).
    Other files (a README, a GGUF written beside the weights) do not count. A folder
    imported from a GGUF file counts as its import record (`from_gguf.import_record`) while
    its files are the names and sizes the record lists and none is newer than the record:
    the same file imported again (after the cache was cleaned) is the same model; one whose
    files were edited, replaced or removed since is not."""
    record = Path(model_dir) / IMPORT_RECORD
    listed = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in counted_files(model_dir)]
    try:
        text, stamp = record.read_text(), record.stat().st_mtime_ns
        made = json.loads(text)
    except (OSError, ValueError):
        return listed
    if isinstance(made, dict) and made.get("files") == [[n, size] for n, size, _ in listed] and all(t <= stamp for *_, t in listed):
        return [[IMPORT_RECORD, text]]
    return listed


def counted_files(model_dir: Path) -> list[Path]:
    """The files `model_files` counts: weights, configs and tokenizer files, the import record aside."""
    found = {p for pattern in MODEL_FILES for p in Path(model_dir).glob(pattern) if p.is_file()}
    return sorted(p for p in found if p.name != IMPORT_RECORD)


def short_digest(text: str) -> str:
    """16 hex digits of SHA-256: what names a cached folder or records an input in a key."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model_dir: Path) -> str:
    """A short digest of ``model_files``, kept in a checkpoint's settings."""
    return short_digest(json.dumps(model_files(model_dir)))
