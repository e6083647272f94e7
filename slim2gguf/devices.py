"""Which torch device a command runs on: one rule for quantize, eval and validate."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when torch sees it), ``cpu``, ``cuda`` or ``cuda:N``; anything else a one-line ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device
