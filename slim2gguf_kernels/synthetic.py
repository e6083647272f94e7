"""Random packed SliM tensors with valid headers, for the kernel tests and benchmark."""

from __future__ import annotations

import numpy as np

from slim2gguf.format import SCALE_VALUE_MASK, SlimType, pack


def balanced_widths(n_groups: int, stype: SlimType, rng: np.random.Generator, raised: int | None = None) -> np.ndarray:
    """Widths averaging exactly ``stype.bits``: ``raised`` groups at b+1, as many at b-1.

    ``raised`` defaults to a random count, anything from uniform widths to all groups moved.
    """
    if raised is None:
        raised = int(rng.integers(0, n_groups // 2 + 1))
    widths = np.full(n_groups, stype.bits, dtype=np.int64)
    picks = rng.permutation(n_groups)[: 2 * raised]
    widths[picks[:raised]] += 1
    widths[picks[raised:]] -= 1
    return widths


def random_packed(rows: int, cols: int, stype: SlimType, rng: np.random.Generator, widths: np.ndarray | None = None) -> np.ndarray:
    """uint8 [rows, row_bytes]: random codes, scales over 2^-18..2^-4 (fp16 subnormals
    included, lowest mantissa bit clear) and offsets ``-d * z`` as asymmetric groups have."""
    g = stype.group_size
    n_groups = cols // g
    if widths is None:
        widths = balanced_widths(n_groups, stype, rng)
    levels = (1 << widths)[None, :, None]
    codes = rng.integers(0, levels, size=(rows, n_groups, g), dtype=np.uint8).reshape(rows, cols)
    scale = np.exp2(rng.uniform(-18, -4, size=(rows, n_groups))).astype(np.float16)
    d = (scale.view(np.uint16) & SCALE_VALUE_MASK).view(np.float16)
    m = (-d.astype(np.float32) * rng.uniform(0, levels[..., 0] - 1)).astype(np.float16)
    return pack(codes, d, m, widths, stype)
