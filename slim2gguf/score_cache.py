"""Sensitivity scores kept between runs, so files of several sizes measure once.

A ``--bpw`` run's scores depend on the model's weights, the calibration tokens the
estimator reads, the estimator, the candidates and the code and libraries that round
and run them, not on the budget; measuring them (the Fisher pass over the whole float
model, then every candidate's rounding of every tensor) costs far more than the
knapsack. So they are saved under a key made of those, and read back only when the key
matches exactly, the saved scores cover every candidate and the file is intact.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from . import sensitivity
from .atomic import write_bytes_atomic
from .budget import ModelShapes
from .paths import cache_dir, model_files, source_digest


def score_key(model_dir: Path, windows: torch.Tensor, method: str, shapes: ModelShapes, device: torch.device) -> dict[str, Any]:
    """What the scores depend on (the device too: float sums differ between them). The
    estimator's settings are named as well as hashed with the code, so a caller that
    changes them at run time gets another key."""
    tokens = sensitivity.estimator_windows(windows).to(torch.int64).contiguous().cpu().numpy()
    return {
        "model": str(Path(model_dir).resolve()),  # two copies of a model whose files keep their sizes and times
        "model_files": model_files(model_dir),
        "windows": [list(tokens.shape), hashlib.sha256(tokens.tobytes()).hexdigest()],
        "method": method,
        "sample_rows": sensitivity.SAMPLE_ROWS,
        "candidates": {name: [label for label, _ in choices] for name, choices in shapes.candidates().items()},
        "device": device.type,
        "code": source_digest(),  # any change may change how a candidate rounds or is scored
        "versions": {package: version(package) for package in ("torch", "transformers", "gguf", "numpy")},
    }


def root() -> Path:
    """The folder of saved scores."""
    return cache_dir() / "sensitivity"


def path_of(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root() / f"{digest}.json"


def load_scores(key: dict[str, Any]) -> dict[str, dict[str, float]] | None:
    """The scores saved under ``key``, or None (none saved, another key, unreadable, or
    missing a candidate)."""
    try:
        saved = json.loads(path_of(key).read_text())
        scores = saved["scores"]
        if saved["key"] != key or not all(set(labels) <= set(scores[name]) for name, labels in key["candidates"].items()):
            return None
        return {name: {label: float(score) for label, score in row.items()} for name, row in scores.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save_scores(key: dict[str, Any], scores: dict[str, dict[str, float]]) -> bool:
    """Written whole (temporary file, then rename); False where the cache cannot be written."""
    try:
        write_bytes_atomic(path_of(key), json.dumps({"key": key, "scores": scores}).encode())
    except OSError:
        return False
    return True
