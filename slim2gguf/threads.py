"""Intra-op threads on the CPU: one around loops of tiny ops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

@contextlib.contextmanager
def few_threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU, around the loops of tiny ops (GPTQ's columns, the
    group fits): there thread hand-off costs far more than it saves (measured 10-25x
    slower with 2 threads on a 2-core machine). The large factorizations and matmuls
    around them run on every thread (2x faster there)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

