"""Layer-level quantizer ablations: the relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)
of one class of linears, quantized with variants of the quantizer, in seconds per variant.

Why: the frontier harness (bench_frontier.py) measures what users see, the model's KL
divergence, but needs a file and a llama.cpp run per setting; this measures the quantity
GPTQ minimizes on the same calibration inputs, side by side, to decide which changes
deserve a frontier run. Inputs are captured from the float model (every other linear
float), on the calibration windows bench_frontier's files use (32 × 512 tokens of
WikiText-2 valid, seed 0), and on as many held-out windows (WikiText-2 test, the text the
frontier's KLD is measured on, when present): each cell reads "calibration / held-out".
GPTQ fits the calibration inputs' Hessian, so a gain there need not reach the KLD; the
held-out error is the closer proxy (docs/BENCHMARKS.md, "GPTQ's gain on held-out inputs").

    python scripts/bench_layer_error.py --model smollm2-135m --tensor ffn_down --blocks 1,8,16,24

Variants: ``default`` (the quantizer as it stands), ``no-refit`` (scales as GPTQ fitted
them), ``no-sba`` (uniform widths), ``sba-slim`` (widths from SliM's min-max/KL scoring),
``act-order`` (``--act-order``: GPTQ visits columns by decreasing H_jj, each group's
quantizer fitted before the pass on the unquantized weights, then refitted).

``--native q4_k,q2_k`` measures stock types instead (``--format native``): ``rtn`` (each
block fitted evenly, rounded), ``gptq`` (GPTQ, blocks fitted evenly), ``slim`` (fitted
by the inputs' energy), ``slim+refit`` (then each row's free scales re-solved),
``+act-order`` (and GPTQ by decreasing H_jj; blocks fitted before the pass).
``--llama-types Q4_K,Q2_K`` adds the same error of llama-quantize's tensors, read from the
tensor-level files bench_frontier made (``--tensors TENSOR``, same calibration text).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim2gguf.allocation import search_allocation  # noqa: E402
from slim2gguf.architectures import TENSOR_CLASSES  # noqa: E402
from slim2gguf.calib import windows_from_text  # noqa: E402
from slim2gguf.gptq import damped_hessian, inverse_cholesky_upper  # noqa: E402
from slim2gguf.methods import QuantSettings, quantize_linear  # noqa: E402
from slim2gguf.models import block_linears, load_model, load_tokenizer, resolve_model  # noqa: E402
from slim2gguf.pipeline import BATCH, InputCollector, token_sample  # noqa: E402
from slim2gguf.qtensor import NativeTensor, QuantizedTensor  # noqa: E402
from slim2gguf.refit import output_error  # noqa: E402
from slim2gguf.storage import native_type  # noqa: E402

VARIANTS = ("default", "no-refit", "no-sba", "sba-slim", "act-order")
NATIVE_VARIANTS = {
    "rtn": {"method": "rtn", "refit": False},
    "gptq": {"method": "gptq", "refit": False},
    "slim": {"method": "slim", "refit": False},
    "slim+refit": {"method": "slim", "refit": True},
    "+act-order": {"method": "slim", "refit": True, "act_order": True},
}
SEED = 0  # calibration windows and SBA's token sample, as bench_frontier's files


class _Collected(Exception):
    """Raised by the last collecting hook to end a forward pass early."""


def _stop(_module, _inputs, _output) -> None:
    raise _Collected


@torch.no_grad()
def capture(
    model_name: str, tensor: str, blocks: list[int], calib: Path, settings: QuantSettings, held_out: Path | None = None
) -> dict[int, dict[str, torch.Tensor]]:
    """Per block: the linear's float weight, its inputs' Hessian and token sample as the
    pipeline collects them (same collector, same seeded sample), and with ``held_out``
    the Hessian of the same number of windows of that text ("H_test")."""
    path = resolve_model(model_name)
    model, tokenizer = load_model(path), load_tokenizer(path)
    suffixes = TENSOR_CLASSES[tensor]
    linears = {b: next(m for n, m in block_linears(model, b).items() if n.endswith(suffixes)) for b in blocks}

    def collect(text: Path) -> dict[int, InputCollector]:
        windows = windows_from_text(text.read_text(encoding="utf-8"), tokenizer, 32, 512, SEED)
        sampling = (windows.numel(), token_sample(windows.numel(), settings.sba_tokens, SEED))
        found = {b: InputCollector(lin, *sampling, torch.device("cpu")) for b, lin in linears.items()}
        handles = [linears[b].register_forward_hook(col) for b, col in found.items()]
        handles.append(linears[max(blocks)].register_forward_hook(_stop))  # the later blocks and the head are not needed
        for start in range(0, windows.shape[0], BATCH):
            try:
                model(windows[start : start + BATCH])
            except _Collected:
                pass
        for h in handles:
            h.remove()
        return found

    cal = collect(calib)
    layers = {b: {"W": linears[b].weight.data.clone(), "H": col.h, "x": torch.cat(col.sample)} for b, col in cal.items()}
    if held_out is not None:
        for b, col in collect(held_out).items():
            layers[b]["H_test"] = col.h
    return layers


def quantize(variant: str, layer: dict[str, torch.Tensor], settings: QuantSettings) -> QuantizedTensor | NativeTensor:
    w, hess, x = layer["W"], layer["H"], layer["x"]
    if variant != "sba-slim":
        changed = {"no-refit": {"refit": False}, "no-sba": {"sba": False}, "act-order": {"act_order": True}}.get(variant, {})
        return quantize_linear(w, hess, x, replace(settings, **changed))[0]
    h, wd = damped_hessian(hess, w, settings.damp)
    widths, _ = search_allocation(wd, inverse_cholesky_upper(h), x, settings.bits, settings.group_size)
    return quantize_linear(w, hess, x, settings, widths)[0]


def relative_error(layer: dict[str, torch.Tensor], approx: torch.Tensor, hessian: str = "H") -> float:
    energy = output_error(layer["W"], torch.zeros_like(layer["W"]), layer[hessian]).sum()
    return float(output_error(layer["W"], approx, layer[hessian]).sum() / energy)


def mean_errors(layers: dict[int, dict[str, torch.Tensor]], approx: dict[int, torch.Tensor], digits: int = 5) -> str:
    """Mean relative error over the blocks: "calibration / held-out" (calibration alone without held-out inputs)."""
    keys = ["H", "H_test"] if all("H_test" in layer for layer in layers.values()) else ["H"]
    means = [sum(relative_error(layers[b], approx[b], key) for b in layers) / len(layers) for key in keys]
    return " / ".join(f"{m:.{digits}f}" for m in means)


def native_table(layers: dict[int, dict[str, torch.Tensor]], types: list[str], variants: list[str], damps: list[float]) -> None:
    """Mean relative output error of each stock type under each native variant, a row per damping."""
    print("| type | damp | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for name in types:
        for damp in damps:
            row = []
            for variant in (NATIVE_VARIANTS[v] for v in variants):
                if variant.get("act_order") and native_type(name).span > 1:
                    row.append("n/a")  # the lattice types round runs of columns in order
                    continue
                settings = QuantSettings(native=name, damp=damp, **variant)
                row.append(mean_errors(layers, {b: quantize_linear(layer["W"], layer["H"], None, settings)[0].dequantize() for b, layer in layers.items()}))
            print(f"| {name} | {damp:g} | " + " | ".join(row) + " |", flush=True)


def llama_table(layers: dict[int, dict[str, torch.Tensor]], model: str, tensor: str, types: list[str]) -> None:
    """Mean relative output error of llama-quantize's tensors (imatrix from 32 × 512 tokens of
    WikiText-2 valid), dequantized by gguf-py from bench_frontier's cached files."""
    import gguf
    import numpy as np

    from slim2gguf.named_models import find
    from slim2gguf.paths import cache_dir

    work = cache_dir() / "frontier" / (find(model).name if find(model) else Path(model).name)
    print("| llama.cpp type | relative output error |")
    print("|---|---|")
    for name in types:
        path = work / f"{name}-{tensor}-imatrix-valid-32x512.gguf"
        if not path.is_file():
            sys.exit(f"no {path}: run bench_frontier.py --model {model} --tensors {tensor} --types {name} first")
        stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
        approx = {}
        for block, layer in layers.items():
            t = stored[f"blk.{block}.{tensor}.weight"]
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
            approx[block] = torch.from_numpy(values).reshape(layer["W"].shape)
        print(f"| {name} | {mean_errors(layers, approx, digits=6)} |", flush=True)  # llama-quantize's K-quants reach 0.0002


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tensor", default="ffn_down", choices=sorted(TENSOR_CLASSES))
    parser.add_argument("--blocks", default="1,8,16,24")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--variants", help=f"SliM variants (default: {','.join(VARIANTS)}); with --native, native variants (default: {','.join(NATIVE_VARIANTS)})")
    parser.add_argument("--native", help="comma-separated stock types to measure instead of SliM variants")
    parser.add_argument("--llama-types", help="comma-separated llama.cpp types whose bench_frontier tensor-level files to measure too")
    parser.add_argument("--calib", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt")
    parser.add_argument("--held-out", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw",
                        help="text whose inputs measure the error out of sample (skipped when absent)")  # fmt: skip
    parser.add_argument("--damp", default=f"{QuantSettings.damp:g}", help="GPTQ's damping (fraction of mean diag H); several, comma-separated, give a row each")
    args = parser.parse_args()
    known = tuple(NATIVE_VARIANTS) if args.native else VARIANTS
    variants = args.variants.split(",") if args.variants else list(known)
    unknown = set(variants) - set(known)
    if unknown:
        sys.exit(f"unknown variant {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    try:
        damps = [float(d) for d in args.damp.split(",")]
    except ValueError:
        sys.exit(f"--damp takes numbers, comma-separated, not {args.damp!r}")
    try:  # QuantSettings holds the rules for the group size and the damping
        settings = [QuantSettings("slim", 3, args.group_size, damp=damp) for damp in damps]
    except ValueError as err:
        sys.exit(str(err))
    if not args.calib.is_file():
        sys.exit(f"no calibration text at {args.calib}")
    torch.set_num_threads(1)
    held_out = args.held_out if args.held_out.is_file() else None
    layers = capture(args.model, args.tensor, [int(b) for b in args.blocks.split(",")], args.calib, settings[0], held_out)
    print(f"{args.model} {args.tensor}, blocks {args.blocks}: mean relative output error, "
          + ("calibration / held-out" if held_out else "calibration inputs"))  # fmt: skip
    if args.native:
        native_table(layers, args.native.split(","), variants, damps)
    if args.llama_types:
        llama_table(layers, args.model, args.tensor, args.llama_types.split(","))
    if args.native or args.llama_types:
        return
    print(f"SliM g{args.group_size}")
    print("| bits | damp | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for bits in (int(b) for b in args.bits.split(",")):
        for damp in damps:
            settings = QuantSettings("slim", bits, args.group_size, damp=damp)
            row = [mean_errors(layers, {b: quantize(variant, layer, settings).dequantize() for b, layer in layers.items()}) for variant in variants]
            print(f"| {bits} | {damp:g} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
