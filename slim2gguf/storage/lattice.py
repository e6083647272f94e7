"""ggml's lattice i-quants: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S.

A 256-wide block holds one fp16 ``d`` and a 4-bit sub-scale per 16 or 32 weights; each
run of 4 (IQ3) or 8 (IQ2) weights stores the index of a point of the type's grid (the
magnitudes, all positive) and each weight a sign (IQ2_XXS, IQ2_XS, IQ3_XXS: 7 bits per 8
weights, an even number of them negative). Here a weight's code names a signed grid
magnitude, so a weight is still ``scale[sub] * level[code]`` and GPTQ, the refit and the
readers treat these types as the others; what differs is rounding: a run of ``span``
weights is rounded at once (``round``), to the nearest grid point under per-weight
importance, which is why GPTQ feeds their error back span by span (gptq.gptq_blocks).
The grids are gguf-py's (gguf.quants), the same tables ggml holds.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType, quants

from ..threads import every_thread
from .base import BlockParams, Fields, NativeType, fp16_bytes, fp16_from, nibbles, to_fp16
from .fitting import weights_of

# Trial scales: a sub-block's largest weight at this fraction of the grid's top magnitude.
# Eight are as good as 19 at a third of the cost (layer error within 0.5 %, docs/BENCHMARKS.md).
CANDIDATES = tuple(0.6 + 0.09 * i for i in range(8))
# Scores (rows x runs x grid points) computed at once, per device type: on a CPU few enough
# (4 MiB, the two cores' L2 here) that ``min`` reads them from cache, not memory (up to 3x
# faster than 1 << 24, docs/BENCHMARKS.md); elsewhere many, for few launches.
SCORE_ELEMENTS = {"cpu": 1 << 20}
SCORE_ELEMENTS_DEFAULT = 1 << 24


class Lattice(NativeType):
    """A grid of ``vector``-long magnitude runs, signs per weight, 4-bit sub-scales under fp16 d."""

    block_size = 256
    scale_range = (0, 15)
    reference: type  # the gguf.quants class that holds the grid
    vector: int  # weights per grid point
    even_signs: bool  # 7 stored sign bits per 8 weights; the eighth makes the count of negatives even

    def __init__(self) -> None:
        self.reference.init_grid()
        magnitudes = np.asarray(self.reference.grid_map, dtype=np.float32)
        self.levels = tuple(int(v) for v in np.concatenate([-magnitudes[::-1], magnitudes]))
        super().__init__()
        grid = np.asarray(self.reference.grid, dtype=np.float32).reshape(self.reference.grid_shape)
        self._grid = torch.from_numpy(grid)
        self._grid_mags = torch.from_numpy(np.searchsorted(magnitudes, grid).astype(np.int64))  # [G, vector]
        n = len(magnitudes)
        keys = (self._grid_mags.numpy() * n ** np.arange(self.vector)).sum(axis=1)
        self._index_of = np.full(n**self.vector, -1, dtype=np.int64)
        self._index_of[keys] = np.arange(len(grid))

    @property
    def span(self) -> int:
        """Weights rounded at once: a grid point, or the 8 weights whose signs are stored together."""
        return 8 if self.even_signs else self.vector

    @property
    def n_mags(self) -> int:
        return len(self.levels) // 2

    def round(
        self, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, importance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and stored values of runs of ``span`` weights (``w`` [rows, n]) under one
        scale per run (``scale`` [rows] or per weight [rows, n]), each run rounded to its
        nearest grid point under ``importance`` [n] (even when None)."""
        rows, n = w.shape
        per_run = (scale[:, None].expand(rows, n) if scale.dim() == 1 else scale).reshape(rows, -1, self.span)[..., 0]
        a = torch.ones(n, device=w.device) if importance is None else importance.float()
        codes = self._codes(w.float().view(rows, -1, self.span), per_run, a.view(-1, self.span))
        levels = self._levels.to(w.device)[codes].view(rows, n)
        return codes.view(rows, n), per_run.repeat_interleave(self.span, 1) * levels

    def _codes(self, x: torch.Tensor, scale: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Codes [R, M, span] of runs x [R, M, span] under scale [R, M], weighted by a [M, span]."""
        rows, runs, span = x.shape
        neg = x < 0
        if self.even_signs:  # an odd count of negatives: flip the sign that costs least
            groups = neg.view(rows, runs, span // 8, 8)
            odd = groups.sum(-1) % 2 == 1
            cost = (a * x * x).view(rows, runs, span // 8, 8)
            flip = torch.nn.functional.one_hot(cost.argmin(-1), 8).bool() & odd[..., None]
            neg = (groups ^ flip).view(rows, runs, span)
        sign = torch.where(neg, -1.0, 1.0)
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))[..., None]
        y = torch.where(scale[..., None] != 0, x * sign / safe, torch.zeros_like(x))
        points = self._nearest(y.view(rows, runs, -1, self.vector), a.view(runs, -1, self.vector))
        mags = self._grid_mags.to(x.device)[points].view(rows, runs, span)
        return torch.where(neg, self.n_mags - 1 - mags, self.n_mags + mags)

    def _nearest(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Grid point [R, M, P] nearest each run y [R, M, P, vector] under weights a [M, P, vector]:
        the argmin over the grid of Σ a g² − 2 Σ a y g, one batched matmul with the bias added
        in (baddbmm) per chunk of rows, then ``min`` (twice as fast as ``argmin`` here on a CPU),
        on every thread even inside GPTQ's one-thread loop."""
        grid = self._grid.to(y.device)
        rows, runs, per, _ = y.shape
        n = runs * per
        bias = (a @ (grid * grid).T).reshape(n, 1, -1)  # [M·P, 1, G]
        ay = (a * y).reshape(rows, n, self.vector).transpose(0, 1).contiguous()  # [M·P, R, vector]
        grid_t = grid.T.expand(n, self.vector, grid.shape[0])
        out = torch.empty(n, rows, dtype=torch.long, device=y.device)
        budget = SCORE_ELEMENTS.get(y.device.type, SCORE_ELEMENTS_DEFAULT)
        chunk = max(1, budget // max(1, n * grid.shape[0]))
        with every_thread():
            for r in range(0, rows, chunk):
                out[:, r : r + chunk] = torch.baddbmm(bias, ay[:, r : r + chunk], grid_t, alpha=-2).min(-1).indices
        return out.T.contiguous().view(rows, runs, per)

    def _fit_rows(self, w: torch.Tensor, importance: torch.Tensor) -> BlockParams:
        rows = w.shape[0]
        x = w.float().view(rows, self.n_sub, self.sub_size)
        a = weights_of(importance, (self.n_sub, self.sub_size))
        runs = x.view(rows, -1, self.span)
        per_sub = self.sub_size // self.span
        top = float(self._grid.max())
        extreme = x.abs().amax(-1)
        best_err = torch.full((rows, self.n_sub), float("inf"), device=w.device)
        best = torch.zeros(rows, self.n_sub, device=w.device)
        for fraction in CANDIDATES:
            trial = (extreme / (top * fraction)).repeat_interleave(per_sub, 1)
            lev = self._levels.to(w.device)[self._codes(runs, trial, a.view(-1, self.span))].view_as(x)
            num, den = (a * lev * x).sum(-1), (a * lev * lev).sum(-1)
            scale = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)).clamp_min(0)
            err = (a * (scale[..., None] * lev - x).pow(2)).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, scale, best)
        d = to_fp16(best.amax(-1) / self.factor(torch.tensor(15.0)))
        df = d.float()[:, None]
        safe = torch.where(df > 0, df, torch.ones_like(df))
        sc = torch.where(df > 0, torch.round(self.code_of(best / safe)), torch.zeros_like(best)).clamp_(0, 15)
        return self.params({"d": d, "sc": sc.to(torch.uint8)})

    def factor(self, sc: torch.Tensor) -> torch.Tensor:
        """A sub-block's scale in units of d, for stored sub-scale ``sc``."""
        return self.sub_scales({"d": torch.ones(1, dtype=torch.float16), "sc": sc.reshape(1, -1)})[0].reshape(sc.shape)

    def code_of(self, ratio: torch.Tensor) -> torch.Tensor:
        """The real-valued sub-scale whose factor is ``ratio`` (factor is affine in sc)."""
        lo, hi = self.factor(torch.tensor(0.0)), self.factor(torch.tensor(1.0))
        return (ratio - lo) / (hi - lo)

    def _grid_index(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes [N, 256] -> grid indices [N, 256 / vector] and sign bits [N, 256]."""
        n = self.n_mags
        neg = codes < n
        mags = np.where(neg, n - 1 - codes.astype(np.int64), codes.astype(np.int64) - n)
        keys = (mags.reshape(codes.shape[0], -1, self.vector) * n ** np.arange(self.vector)).sum(axis=2)
        index = self._index_of[keys]
        if (index < 0).any():
            raise ValueError(f"{self.name}: codes off the grid")
        return index, neg.astype(np.uint8)

    def _codes_of(self, index: np.ndarray, neg: np.ndarray) -> np.ndarray:
        """Grid indices [N, 256 / vector] and sign bits [N, 256] -> codes [N, 256]."""
        mags = self._grid_mags.numpy()[index].reshape(index.shape[0], -1)
        return np.where(neg.astype(bool), self.n_mags - 1 - mags, self.n_mags + mags).astype(np.uint8)

    def _sign_bytes(self, neg: np.ndarray) -> np.ndarray:
        """Sign bits [N, 256] -> one byte per 8 weights [N, 32] (weight i of a run at bit i)."""
        return np.packbits(neg.reshape(neg.shape[0], 32, 8), axis=2, bitorder="little").reshape(-1, 32)

    @staticmethod
    def _signs_of(data: np.ndarray) -> np.ndarray:
        return np.unpackbits(data[..., None], axis=-1, bitorder="little").reshape(data.shape[0], -1)

    def _sign_indices(self, neg: np.ndarray) -> np.ndarray:
        """7-bit sign indices [N, 32] of runs whose negatives are even in count."""
        signs = self._sign_bytes(neg)
        if (np.unpackbits(signs, axis=1).reshape(-1, 32, 8).sum(axis=2) % 2).any():
            raise ValueError(f"{self.name}: an odd number of negative weights in a run of 8")
        return signs & 0x7F

    @staticmethod
    def _unsigned(index: np.ndarray) -> np.ndarray:
        """7-bit sign indices -> the 8 sign bits, the eighth restoring even parity (ggml's ksigns)."""
        index = index.astype(np.uint8)
        parity = np.unpackbits(index[..., None], axis=-1).sum(axis=-1) % 2
        return Lattice._signs_of((index | (parity.astype(np.uint8) << 7)).reshape(index.shape[0], -1))

    def _signs_and_scales(self, neg: np.ndarray, sc: np.ndarray) -> np.ndarray:
        """IQ2_XXS's and IQ3_XXS's u32 per 32 weights [N, 8]: four 7-bit sign indices, the sub-scale in the top 4 bits."""
        signs = self._sign_indices(neg).reshape(neg.shape[0], 8, 4).astype(np.uint32)
        aux = (signs << (7 * np.arange(4, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)
        return aux | (sc.astype(np.uint32) << 28)

    def _from_signs_and_scales(self, aux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """u32 [N, 8] -> sign bits [N, 256] and sub-scales [N, 8]."""
        signs = (aux[:, :, None] >> (7 * np.arange(4, dtype=np.uint32))) & 0x7F
        return self._unsigned(signs.reshape(aux.shape[0], 32)), (aux >> 28).astype(np.uint8)


def _u32(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype="<u4").view(np.uint8).reshape(values.shape[0], -1)


class IQ2_XXS(Lattice):
    """d, then per 32 weights two u32: four 8-bit grid indices; four 7-bit sign indices
    and the sub-scale in the top 4 bits. A sub-block's scale is d * (0.5 + sc) * 0.25."""

    name = "IQ2_XXS"
    ggml_type = int(QT.IQ2_XXS)
    file_type = int(LlamaFileType.MOSTLY_IQ2_XXS)
    type_size = 66
    sub_size = 32
    reference = quants.IQ2_XXS
    vector = 8
    even_signs = True

    def sub_scales(self, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        scale = fields["d"].float()[:, None] * (0.5 + fields["sc"].float()) * 0.25
        return scale, torch.zeros_like(scale)

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        index, neg = self._grid_index(codes)
        n = codes.shape[0]
        aux = _u32(self._signs_and_scales(neg, fields["sc"])).reshape(n, 8, 4)
        body = np.concatenate([index.astype(np.uint8).reshape(n, 8, 4), aux], axis=2).reshape(n, 64)
        return np.concatenate([fp16_bytes(fields["d"]), body], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = blocks.shape[0]
        body = blocks[:, 2:].reshape(n, 8, 8)
        neg, sc = self._from_signs_and_scales(np.ascontiguousarray(body[:, :, 4:]).view("<u4").reshape(n, 8))
        return self._codes_of(body[:, :, :4].reshape(n, 32), neg), {"d": fp16_from(blocks[:, :2]), "sc": sc}


class IQ2_XS(Lattice):
    """d, 32 u16 (per 8 weights: a 9-bit grid index and a 7-bit sign index above it),
    8 bytes of 4-bit sub-scales per 16 weights (low nibble first). Scale: d * (0.5 + sc) * 0.25."""

    name = "IQ2_XS"
    ggml_type = int(QT.IQ2_XS)
    file_type = int(LlamaFileType.MOSTLY_IQ2_XS)
    type_size = 74
    sub_size = 16
    reference = quants.IQ2_XS
    vector = 8
    even_signs = True
    sub_scales = IQ2_XXS.sub_scales

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        index, neg = self._grid_index(codes)
        qs = index.astype(np.uint16) | (self._sign_indices(neg).astype(np.uint16) << 9)
        qs_bytes = np.ascontiguousarray(qs, dtype="<u2").view(np.uint8).reshape(codes.shape[0], 64)
        sc = fields["sc"].astype(np.uint8)
        return np.concatenate([fp16_bytes(fields["d"]), qs_bytes, nibbles(sc[:, 0::2], sc[:, 1::2])], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = blocks.shape[0]
        qs = np.ascontiguousarray(blocks[:, 2:66]).view("<u2").reshape(n, 32)
        scales = blocks[:, 66:74]
        sc = np.stack([scales & 0x0F, scales >> 4], axis=2).reshape(n, 16)
        codes = self._codes_of(qs & 511, self._unsigned(qs >> 9))
        return codes, {"d": fp16_from(blocks[:, :2]), "sc": sc}


class IQ2_S(Lattice):
    """d, 32 bytes of the grid indices' low 8 bits, 32 sign bytes (one per 8 weights),
    8 bytes of their top 2 bits (4 per byte), 8 bytes of 4-bit sub-scales per 16 weights.
    Scale: d * (0.5 + sc) * 0.25."""

    name = "IQ2_S"
    ggml_type = int(QT.IQ2_S)
    file_type = int(LlamaFileType.MOSTLY_IQ2_S)
    type_size = 82
    sub_size = 16
    reference = quants.IQ2_S
    vector = 8
    even_signs = False
    sub_scales = IQ2_XXS.sub_scales

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        index, neg = self._grid_index(codes)
        n = codes.shape[0]
        high = (index >> 8).reshape(n, 8, 4).astype(np.uint8)
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        sc = fields["sc"].astype(np.uint8)
        parts = [fp16_bytes(fields["d"]), (index & 0xFF).astype(np.uint8), self._sign_bytes(neg), qh, nibbles(sc[:, 0::2], sc[:, 1::2])]
        return np.concatenate(parts, axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = blocks.shape[0]
        qh = (blocks[:, 66:74, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3
        index = blocks[:, 2:34].astype(np.int64) | (qh.reshape(n, 32).astype(np.int64) << 8)
        scales = blocks[:, 74:82]
        sc = np.stack([scales & 0x0F, scales >> 4], axis=2).reshape(n, 16)
        return self._codes_of(index, self._signs_of(blocks[:, 34:66])), {"d": fp16_from(blocks[:, :2]), "sc": sc}


class IQ3_XXS(Lattice):
    """d, 64 bytes of 8-bit grid indices (per 4 weights), then per 32 weights a u32:
    four 7-bit sign indices and the sub-scale in the top 4 bits. Scale: d * (0.5 + sc) * 0.5."""

    name = "IQ3_XXS"
    ggml_type = int(QT.IQ3_XXS)
    file_type = int(LlamaFileType.MOSTLY_IQ3_XXS)
    type_size = 98
    sub_size = 32
    reference = quants.IQ3_XXS
    vector = 4
    even_signs = True

    def sub_scales(self, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        scale = fields["d"].float()[:, None] * (0.5 + fields["sc"].float()) * 0.5
        return scale, torch.zeros_like(scale)

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        index, neg = self._grid_index(codes)
        aux = _u32(self._signs_and_scales(neg, fields["sc"]))
        return np.concatenate([fp16_bytes(fields["d"]), index.astype(np.uint8), aux], axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        neg, sc = self._from_signs_and_scales(np.ascontiguousarray(blocks[:, 66:98]).view("<u4").reshape(-1, 8))
        return self._codes_of(blocks[:, 2:66], neg), {"d": fp16_from(blocks[:, :2]), "sc": sc}


class IQ3_S(Lattice):
    """d, 64 bytes of the grid indices' low 8 bits (per 4 weights), 8 bytes of their ninth
    bits, 32 sign bytes (one per 8 weights), 4 bytes of 4-bit sub-scales per 32 weights.
    Scale: d * (1 + 2 sc)."""

    name = "IQ3_S"
    ggml_type = int(QT.IQ3_S)
    file_type = int(LlamaFileType.MOSTLY_IQ3_S)
    type_size = 110
    sub_size = 32
    reference = quants.IQ3_S
    vector = 4
    even_signs = False

    def sub_scales(self, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        scale = fields["d"].float()[:, None] * (1 + 2 * fields["sc"].float())
        return scale, torch.zeros_like(scale)

    def encode(self, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
        index, neg = self._grid_index(codes)
        qh = np.packbits((index >> 8).astype(np.uint8), axis=1, bitorder="little")
        sc = fields["sc"].astype(np.uint8)
        parts = [fp16_bytes(fields["d"]), (index & 0xFF).astype(np.uint8), qh, self._sign_bytes(neg), nibbles(sc[:, 0::2], sc[:, 1::2])]
        return np.concatenate(parts, axis=1)

    def decode(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = blocks.shape[0]
        high = np.unpackbits(blocks[:, 66:74], axis=1, bitorder="little").astype(np.int64)
        index = blocks[:, 2:66].astype(np.int64) | (high << 8)
        scales = blocks[:, 106:110]
        sc = np.stack([scales & 0x0F, scales >> 4], axis=2).reshape(n, 8)
        return self._codes_of(index, self._signs_of(blocks[:, 74:106])), {"d": fp16_from(blocks[:, :2]), "sc": sc}
