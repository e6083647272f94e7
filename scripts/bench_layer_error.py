"""Layer-level quantizer ablations: the relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)
of one class of linears, quantized with variants of the quantizer, in seconds per variant.

Why: the frontier harness (bench_frontier.py) measures what users see, the model's KL
divergence, but needs a file and a llama.cpp run per setting; this measures the quantity
GPTQ minimizes on the same calibration inputs, side by side, to decide which changes
deserve a frontier run. Inputs are captured from the float model (every other linear
float), on the calibration windows bench_frontier's files use (32 × 512 tokens of
WikiText-2 valid, seed 0).

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


@torch.no_grad()
def capture(model_name: str, tensor: str, blocks: list[int], calib: Path, settings: QuantSettings) -> dict[int, dict[str, torch.Tensor]]:
    """Per block: the linear's float weight, and its inputs' Hessian and token sample as the
    pipeline collects them (same collector, same seeded sample)."""
    path = resolve_model(model_name)
    model, tokenizer = load_model(path), load_tokenizer(path)
    windows = windows_from_text(calib.read_text(encoding="utf-8"), tokenizer, 32, 512, SEED)
    sampling = (windows.numel(), token_sample(windows.numel(), settings.sba_tokens, SEED))
    suffixes = TENSOR_CLASSES[tensor]
    found = {}
    for b in blocks:
        lin = next(m for n, m in block_linears(model, b).items() if n.endswith(suffixes))
        found[b] = (lin, InputCollector(lin, *sampling, torch.device("cpu")))
    handles = [lin.register_forward_hook(col) for lin, col in found.values()]
    for start in range(0, windows.shape[0], BATCH):
        model(windows[start : start + BATCH])
    for h in handles:
        h.remove()
    return {b: {"W": lin.weight.data.clone(), "H": col.h, "x": torch.cat(col.sample)} for b, (lin, col) in found.items()}


def quantize(variant: str, layer: dict[str, torch.Tensor], settings: QuantSettings) -> QuantizedTensor | NativeTensor:
    w, hess, x = layer["W"], layer["H"], layer["x"]
    if variant != "sba-slim":
        changed = {"no-refit": {"refit": False}, "no-sba": {"sba": False}, "act-order": {"act_order": True}}.get(variant, {})
        return quantize_linear(w, hess, x, replace(settings, **changed))[0]
    h, wd = damped_hessian(hess, w, settings.damp)
    widths, _ = search_allocation(wd, inverse_cholesky_upper(h), x, settings.bits, settings.group_size)
    return quantize_linear(w, hess, x, settings, widths)[0]


def relative_error(layer: dict[str, torch.Tensor], approx: torch.Tensor) -> float:
    energy = output_error(layer["W"], torch.zeros_like(layer["W"]), layer["H"]).sum()
    return float(output_error(layer["W"], approx, layer["H"]).sum() / energy)


def native_table(layers: dict[int, dict[str, torch.Tensor]], types: list[str]) -> None:
    """Mean relative output error of each stock type under each native variant."""
    print("| type | " + " | ".join(NATIVE_VARIANTS) + " |")
    print("|---|" + "---|" * len(NATIVE_VARIANTS))
    for name in types:
        row = []
        for variant in NATIVE_VARIANTS.values():
            if variant.get("act_order") and native_type(name).span > 1:
                row.append("n/a")  # the lattice types round runs of columns in order
                continue
            settings = QuantSettings(native=name, **variant)
            errors = [relative_error(layer, quantize_linear(layer["W"], layer["H"], None, settings)[0].dequantize()) for layer in layers.values()]
            row.append(f"{sum(errors) / len(errors):.5f}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


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
        errors = []
        for block, layer in layers.items():
            t = stored[f"blk.{block}.{tensor}.weight"]
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
            errors.append(relative_error(layer, torch.from_numpy(values).reshape(layer["W"].shape)))
        print(f"| {name} | {sum(errors) / len(errors):.6f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tensor", default="ffn_down", choices=sorted(TENSOR_CLASSES))
    parser.add_argument("--blocks", default="1,8,16,24")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--native", help="comma-separated stock types to measure instead of SliM variants")
    parser.add_argument("--llama-types", help="comma-separated llama.cpp types whose bench_frontier tensor-level files to measure too")
    parser.add_argument("--calib", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variant {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if not args.calib.is_file():
        sys.exit(f"no calibration text at {args.calib}")
    torch.set_num_threads(1)
    layers = capture(args.model, args.tensor, [int(b) for b in args.blocks.split(",")], args.calib, QuantSettings("slim", 3, args.group_size))
    if args.native:
        native_table(layers, args.native.split(","))
    if args.llama_types:
        llama_table(layers, args.model, args.tensor, args.llama_types.split(","))
    if args.native or args.llama_types:
        return
    print(f"{args.model} {args.tensor}, blocks {args.blocks}, g{args.group_size}: mean relative output error")
    print("| bits | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for bits in (int(b) for b in args.bits.split(",")):
        settings = QuantSettings("slim", bits, args.group_size)
        row = []
        for variant in variants:
            errors = []
            for layer in layers.values():
                qt = quantize(variant, layer, settings)
                energy = output_error(layer["W"], torch.zeros_like(layer["W"]), layer["H"]).sum()
                errors.append(float(output_error(layer["W"], qt.dequantize(), layer["H"]).sum() / energy))
            row.append(sum(errors) / len(errors))
        print(f"| {bits} | " + " | ".join(f"{e:.5f}" for e in row) + " |", flush=True)


if __name__ == "__main__":
    main()
