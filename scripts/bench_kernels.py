"""Benchmark the SliM Triton kernels on LLaMA-7B-shaped layers (needs a CUDA GPU).

For each layer and average width: the GEMV kernel's time and achieved bandwidth
(packed bytes + group table + activations read, output written) as a fraction of the
device's device-to-device copy bandwidth; the tiled kernel's TFLOP/s at prefill size;
torch fp16 matmuls at the same shapes for comparison. The kernels' block sizes are
untuned heuristics, so a few configurations are swept and the best one reported.
Prints a rich table and the same results as a markdown block.

    python scripts/bench_kernels.py --bits 2 --bits 3 --prefill-tokens 2048
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from triton.testing import do_bench

from slim2gguf.format import slim_type
from slim2gguf_kernels import SlimTensor, dequantize, slim_matmul
from slim2gguf_kernels.synthetic import random_packed

app = typer.Typer(add_completion=False)
console = Console()

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out_features, in_features)
GEMV_CONFIGS = tuple((block_n, warps) for block_n in (4, 8, 16, 32) for warps in (1, 2, 4))
TILED_CONFIGS = ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8))  # block_m, block_n, warps
COPY_BYTES = 1 << 30
DEVICE = "cuda"


@dataclass
class Row:
    shape: str
    bits: int
    gemv_us: float
    gemv_fraction: float
    gemv_config: str
    torch_gemv_us: float
    torch_gemv_fraction: float
    prefill_tflops: float
    prefill_config: str
    torch_prefill_tflops: float
    max_rel_err: float

    def cells(self) -> list[str]:
        return [
            self.shape, str(self.bits),
            f"{self.gemv_us:.1f}", f"{100 * self.gemv_fraction:.0f}%", self.gemv_config,
            f"{self.torch_gemv_us:.1f}", f"{100 * self.torch_gemv_fraction:.0f}%",
            f"{self.prefill_tflops:.1f}", self.prefill_config, f"{self.torch_prefill_tflops:.1f}",
            f"{self.max_rel_err:.1e}",
        ]


HEADERS = [
    "layer", "bits", "GEMV us", "GEMV %BW", "GEMV cfg", "fp16 GEMV us", "fp16 %BW",
    "prefill TF/s", "prefill cfg", "fp16 prefill TF/s", "max rel err",
]
LEGEND = (
    "layer: out x in features. %BW: bytes moved per second as a share of the copy bandwidth. "
    "GEMV cfg: block_n/warps; prefill cfg: block_m x block_n/warps (fastest swept). "
    "fp16: torch.matmul on the dequantized fp16 weight. max rel err: prefill output vs fp32 "
    "matmul of the dequantized weight, relative to its largest value."
)


def _time_ms(fn: Callable[[], object]) -> float:
    """Median time; triton's do_bench clears the L2 cache before every run."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes moved (read + written) per second by a large device-to-device copy."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = _time_ms(lambda: dst.copy_(src)) * 1e-3
    return 2 * COPY_BYTES / seconds


def _best(configs: tuple[tuple[int, ...], ...], run: Callable[..., object]) -> tuple[tuple[int, ...], float]:
    """(config, ms) of the fastest of ``run(*config)``."""
    times = {config: _time_ms(lambda config=config: run(*config)) for config in configs}
    best = min(times, key=times.get)
    return best, times[best]


def bench_layer(out_features: int, in_features: int, bits: int, group_size: int, tokens: int,
                copy_bw: float, rng: np.random.Generator) -> Row:
    stype = slim_type(bits, group_size)
    t = SlimTensor.from_packed(random_packed(out_features, in_features, stype, rng), stype, in_features, device=DEVICE)
    x1 = torch.randn(1, in_features, dtype=torch.float16, device=DEVICE)
    y1 = torch.empty(1, out_features, dtype=torch.float16, device=DEVICE)
    gemv_config, gemv_ms = _best(
        GEMV_CONFIGS, lambda bn, warps: slim_matmul(x1, t, out=y1, kernel="gemv", block_n=bn, num_warps=warps)
    )
    moved = t.packed.numel() + 4 * (t.group_index.numel() + t.group_word.numel()) + x1.nbytes + y1.nbytes

    x = torch.randn(tokens, in_features, dtype=torch.float16, device=DEVICE)
    y = torch.empty(tokens, out_features, dtype=torch.float16, device=DEVICE)

    def tiled(bm: int, bn: int, warps: int) -> torch.Tensor:
        return slim_matmul(x, t, out=y, kernel="tiled", block_m=bm, block_n=bn, num_warps=warps)

    tiled_config, tiled_ms = _best(TILED_CONFIGS, tiled)
    flops = 2 * tokens * out_features * in_features

    w16 = dequantize(t, torch.float16)
    torch_gemv_ms = _time_ms(lambda: torch.matmul(x1, w16.T))
    torch_prefill_ms = _time_ms(lambda: torch.matmul(x, w16.T))
    reference = x.float() @ dequantize(t).T
    got = tiled(*tiled_config).float()
    max_rel_err = ((got - reference).abs().max() / reference.abs().max()).item()

    return Row(
        shape=f"{out_features}x{in_features}", bits=bits,
        gemv_us=1e3 * gemv_ms, gemv_fraction=moved / (gemv_ms * 1e-3) / copy_bw,
        gemv_config="{}/{}".format(*gemv_config),
        torch_gemv_us=1e3 * torch_gemv_ms,
        torch_gemv_fraction=(w16.nbytes + x1.nbytes + y1.nbytes) / (torch_gemv_ms * 1e-3) / copy_bw,
        prefill_tflops=flops / (tiled_ms * 1e-3) / 1e12, prefill_config="{}x{}/{}".format(*tiled_config),
        torch_prefill_tflops=flops / (torch_prefill_ms * 1e-3) / 1e12, max_rel_err=max_rel_err,
    )


def markdown(rows: list[Row], device: str, copy_bw: float) -> str:
    lines = [
        f"Device: {device}; device-to-device copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join([*lines, "", LEGEND])


@app.command()
def main(
    bits: list[int] = typer.Option([2, 3], help="average widths to measure"),
    group_size: int = typer.Option(128, help="SliM group size"),
    prefill_tokens: int = typer.Option(2048, help="tokens for the tiled (prefill) kernel"),
    seed: int = typer.Option(0, help="seed for the random packed weights"),
) -> None:
    """Time the GEMV and tiled SliM kernels against torch fp16 on LLaMA-7B layer shapes."""
    if not torch.cuda.is_available():
        Console(stderr=True).print("[red]bench_kernels: no CUDA device is available; this benchmark needs a GPU.[/red]")
        raise typer.Exit(code=2)
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    rng = np.random.default_rng(seed)
    rows = []
    for b in bits:
        for out_features, in_features in SHAPES:
            console.print(f"measuring {out_features}x{in_features} at {b} bits ...")
            rows.append(bench_layer(out_features, in_features, b, group_size, prefill_tokens, copy_bw, rng))
    table = Table(title=f"SliM kernels on {device} (copy bandwidth {copy_bw / 1e9:.0f} GB/s)", caption=LEGEND)
    for header in HEADERS:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(*r.cells())
    console.print(table)
    print(markdown(rows, device, copy_bw))


if __name__ == "__main__":
    app()
