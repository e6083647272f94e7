"""Intra-op threads on the CPU: one around loops of tiny ops, every one for the large ops inside them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_REPLACED: list[int] = []  # the thread counts few_threads replaced, innermost last


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
    _REPLACED.append(before)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _REPLACED.pop()
        torch.set_num_threads(before)


@contextlib.contextmanager
def every_thread() -> Iterator[None]:
    """Inside ``few_threads``, the threads it took away, for the large ops in its loop (a
    block's or group's fit, a lattice type's grid search: 1.3-2x faster on 2 cores,
    docs/BENCHMARKS.md); elsewhere a no-op."""
    if not _REPLACED or torch.get_num_threads() != 1:
        yield
        return
    torch.set_num_threads(_REPLACED[-1])
    try:
        yield
    finally:
        torch.set_num_threads(1)
