"""A whole-file bit budget (``--bpw``) spent across tensors by measured sensitivity.

Each decoder linear may take any SliM setting its input size allows (average width
2-4, group 128/64/32: 2.25-5 bits per weight) or, for ``--format native``, any stock
type whose blocks divide its rows (slim2gguf.storage: Q2_K's 2.625 to Q8_0's 8.5), the
token embedding and an untied output a legacy type (Q4_0-Q8_0) or a K-quant (Q2_K-Q6_K,
where 256 divides their rows); everything else is fixed (1-D tensors F32, linears a
``--tensors`` selection leaves float F16). Sensitivity (``slim2gguf.sensitivity``)
scores every tensor at every candidate; the budget then goes where the summed scores
fall most (a multiple-choice knapsack, solved exactly up to a fine rounding of bits).

A block's experts of one kind (mixture-of-experts models) are one stored tensor once
llama.cpp's converter stacks them, so they take one choice together (``ModelShapes.items``).

Everything here reads shapes only (a weightless model), so an unreachable budget is
refused before any weights load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import format as fmt
from .architectures import in_classes
from .storage import NATIVE_TYPES

# Stock llama.cpp types for the token embedding and output, bits per weight. The
# converter quantizes them with gguf-py (round to nearest within 32-wide blocks).
STANDARD_BPW = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5}
LEGACY_EMBED_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # gguf-py writes these
# gguf-py cannot write these; the exporter rounds them with slim2gguf.storage (each block
# fitted evenly), as the sensitivity pass scores them. A budget may give them to the
# embedding and output, as llama.cpp's mixes do (Q6_K output, Q2_K-Q4_K embedding): at the
# same bits Q4_K has less error than Q4_0 (docs/BENCHMARKS.md).
STORAGE_EMBED_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
EMBED_CANDIDATES = LEGACY_EMBED_TYPES + STORAGE_EMBED_TYPES
SLIM_BITS = (2, 3, 4)
SLIM_GROUPS = (128, 64, 32)
TOLERANCE = 0.02  # how far from the asked bits per weight a file may land
EMBED, OUTPUT = "token_embd", "output"


class BudgetError(ValueError):
    """A budget the model's shapes cannot meet; the message says which budgets can."""


def label(stype: fmt.SlimType) -> str:
    """A linear's choice as the decision records it, e.g. 'slim3-g64'."""
    return f"slim{stype.bits}-g{stype.group_size}"


def parse_label(text: str) -> fmt.SlimType:
    bits, group = text.removeprefix("slim").split("-g")
    return fmt.slim_type(int(bits), int(group))


def choice_bpw(text: str) -> float:
    """Bits per weight of a linear's choice: a SliM label or a stock type's name."""
    return NATIVE_TYPES[text].bits_per_weight if text in NATIVE_TYPES else parse_label(text).bits_per_weight


def stored_as(name: str) -> str:
    """The stored tensor a budgeted tensor lands in: itself, or for an expert's linear its
    block's stack of that kind (``model.layers.3.mlp.experts.*.w1``)."""
    return re.sub(r"\.experts\.\d+\.", ".experts.*.", name)


def linear_settings(in_features: int) -> list[fmt.SlimType]:
    """Every SliM type whose group size divides the linear's input size."""
    return [fmt.SlimType(b, g) for b in SLIM_BITS for g in SLIM_GROUPS if in_features % g == 0]


def linear_choices(in_features: int, native: bool) -> list[tuple[str, float]]:
    """(label, bits per weight) of every choice a linear of this input size can take."""
    if native:
        return [(name, t.bits_per_weight) for name, t in NATIVE_TYPES.items() if in_features % t.block_size == 0]
    return [(label(t), t.bits_per_weight) for t in linear_settings(in_features)]


@dataclass(frozen=True)
class ModelShapes:
    """What the converter writes for a model, by role: budgeted tensors and fixed bits."""

    linears: dict[str, tuple[int, int]]  # quantized decoder linears: [out, in]
    embed: tuple[int, int]
    output: tuple[int, int] | None  # None when tied to the embedding
    fixed_params: int  # 1-D tensors (F32) and unselected linears (F16)
    fixed_bits: float
    native: bool = False  # linears choose among stock types instead of SliM settings

    @property
    def params(self) -> int:
        n = sum(r * c for r, c in self.linears.values()) + self.embed[0] * self.embed[1] + self.fixed_params
        return n + (self.output[0] * self.output[1] if self.output else 0)

    def candidates(self) -> dict[str, list[tuple[str, float]]]:
        """Tensor -> (choice, bits of the whole tensor) for every choice it can take."""
        out = {n: [(k, r * c * b) for k, b in linear_choices(c, self.native)] for n, (r, c) in self.linears.items()}
        for name, shape in ((EMBED, self.embed), (OUTPUT, self.output)):
            if shape is not None:
                out[name] = [
                    (t, shape[0] * shape[1] * NATIVE_TYPES[t].bits_per_weight)
                    for t in EMBED_CANDIDATES
                    if shape[1] % NATIVE_TYPES[t].block_size == 0
                ]
        return out

    def items(self) -> dict[str, list[str]]:
        """Stored tensor -> the budgeted tensors it holds: one, or a block's experts of one
        kind (equal shapes), which take one choice together."""
        groups: dict[str, list[str]] = {}
        for name in self.candidates():
            groups.setdefault(stored_as(name), []).append(name)
        return groups

    def item_candidates(self) -> dict[str, list[tuple[str, float]]]:
        """Stored tensor -> (choice, bits of all it holds) for every choice it can take."""
        cands = self.candidates()
        return {key: [(c, len(names) * b) for c, b in cands[names[0]]] for key, names in self.items().items()}


def model_shapes(model_dir: Path, tensors: tuple[str, ...] | None, native: bool = False) -> ModelShapes:
    """Shapes of every tensor the GGUF file holds, from a weightless (meta-device) instance
    of the causal LM (a multimodal checkpoint's text decoder)."""
    from transformers import AutoModelForCausalLM

    from .models import linear_shapes_of
    from .moe import unfuse
    from .text_model import causal_config

    with torch.device("meta"):
        model = unfuse(AutoModelForCausalLM.from_config(causal_config(model_dir)))
    block = linear_shapes_of(model)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embed
    roles = {id(embed)} | ({id(head.weight)} if not tied else set())
    linears = {n: s for n, s in block.items() if in_classes(n, tensors)}
    fixed_params, fixed_bits = 0, 0.0
    for name, param in model.named_parameters():
        if id(param) in roles or name.removesuffix(".weight") in linears:
            continue
        n = param.numel()
        fixed_params += n
        fixed_bits += n * (16.0 if name.removesuffix(".weight") in block else 32.0)
    output = None if tied else tuple(head.weight.shape)
    return ModelShapes(linears, tuple(embed.shape), output, fixed_params, fixed_bits, native)


def reachable(shapes: ModelShapes) -> tuple[float, float]:
    """The smallest and largest whole-file bits per weight the choices allow."""
    cands = shapes.item_candidates()
    lo = shapes.fixed_bits + sum(min(b for _, b in c) for c in cands.values())
    hi = shapes.fixed_bits + sum(max(b for _, b in c) for c in cands.values())
    return lo / shapes.params, hi / shapes.params


def check_budget(bpw: float, shapes: ModelShapes) -> None:
    """Refuse a budget outside what the shapes allow, naming the reachable range."""
    cands = shapes.candidates()
    stuck = [n for n, c in cands.items() if not c]
    if stuck:
        raise BudgetError(f"{stuck[0]} has {shapes.linears.get(stuck[0], shapes.embed)[1]} columns: no SliM group size "
                          "(32, 64, 128) or 32-wide stock type divides it")  # fmt: skip
    lo, hi = reachable(shapes)
    if not lo - TOLERANCE <= bpw <= hi + TOLERANCE:
        least, most = ("its smallest stock type", "Q8_0") if shapes.native else ("SliM 2-bit at its largest group", "SliM 4-bit at its smallest group")
        embed_least = min(cands[EMBED], key=lambda c: c[1])[0].upper()
        raise BudgetError(
            f"--bpw {bpw:g} is out of reach for this model: from {lo:.2f} (every linear {least}, "
            f"token embedding{'' if shapes.output is None else ' and output'} {embed_least}, 1-D tensors F32) "
            f"to {hi:.2f} ({most}, Q8_0); choose a budget in that range"
        )
    sizes = _file_sizes(shapes)
    if not np.any((sizes >= bpw - TOLERANCE) & (sizes <= bpw + 1e-9)):
        below, above = sizes[sizes <= bpw].max(initial=lo), sizes[sizes > bpw].min(initial=hi)
        raise BudgetError(
            f"--bpw {bpw:g} cannot be met within {TOLERANCE} on this model: its tensors change the file in "
            f"steps too coarse here (the token embedding's stock types above all); the nearest budgets are "
            f"{below:.3f} and {above:.3f}"
        )


def _file_sizes(shapes: ModelShapes) -> np.ndarray:
    """Every whole-file bits per weight the choices can make (each tensor's bits rounded to
    1/50 of the tolerance: near enough to name budgets, exact enough to test one)."""
    unit = TOLERANCE * shapes.params / 50
    options = shapes.item_candidates().values()
    floor = sum(min(b for _, b in c) for c in options)
    span = sum(max(b for _, b in c) for c in options) - floor
    can = np.zeros(int(span / unit) + 2, dtype=bool)
    can[0] = True
    for cands in options:
        low = min(b for _, b in cands)
        new = np.zeros_like(can)
        for c in {round((b - low) / unit) for _, b in cands}:
            new[c:] |= can[: len(can) - c]
        can = new
    return (shapes.fixed_bits + floor + unit * np.flatnonzero(can)) / shapes.params


@dataclass
class Decision:
    """Per-tensor choices for a budget, with the scores they were chosen from."""

    target_bpw: float
    bpw: float  # whole file, as computed from the shapes
    choices: dict[str, str]  # linear module / token_embd / output -> label or stock type
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    sensitivity: str = ""

    def setting(self, name: str) -> fmt.SlimType | str:
        """A linear's SliM type, or the name of its stock type (--format native)."""
        choice = self.choices[name]
        return choice if choice in NATIVE_TYPES else parse_label(choice)

    def to_dict(self) -> dict[str, Any]:
        return {"target_bpw": self.target_bpw, "bpw": self.bpw, "choices": self.choices,
                "scores": self.scores, "sensitivity": self.sensitivity}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(data["target_bpw"], data["bpw"], data["choices"], data.get("scores", {}), data.get("sensitivity", ""))


RESOLUTION = 20000  # budget steps of the knapsack: rounding moves the total by ~0.01 % of the budget


def solve(bpw: float, shapes: ModelShapes, scores: dict[str, dict[str, float]], sensitivity: str = "") -> Decision:
    """Spend ``bpw`` × params bits to minimize the summed scores: a multiple-choice knapsack,
    solved exactly by dynamic programming over the bits above every stored tensor's
    cheapest choice (in RESOLUTION steps); a stack of experts scores the sum of its own."""
    check_budget(bpw, shapes)
    members = shapes.items()
    item_scores = {key: {c: sum(scores[n][c] for n in names) for c in scores[names[0]]} for key, names in members.items()}
    options = {name: sorted(cands, key=lambda c: c[1]) for name, cands in sorted(shapes.item_candidates().items())}
    floor = sum(cands[0][1] for cands in options.values())
    unit = max(bpw * shapes.params - shapes.fixed_bits - floor, 1.0) / RESOLUTION
    best = np.full(RESOLUTION + 1, np.inf)
    best[0] = 0.0
    picks, costs = [], []
    for name, cands in options.items():
        cost = [round((bits - cands[0][1]) / unit) for _, bits in cands]
        new, pick = np.full_like(best, np.inf), np.zeros(best.shape, dtype=np.int16)
        for k, ((choice, _), c) in enumerate(zip(cands, cost)):
            if c > RESOLUTION:
                continue
            total = np.full_like(best, np.inf)
            total[c:] = best[: RESOLUTION + 1 - c] + item_scores[name][choice]
            better = total < new
            new[better], pick[better] = total[better], k
        best = new
        picks.append(pick)
        costs.append(cost)
    first = max(0, int(np.ceil(((bpw - TOLERANCE) * shapes.params - shapes.fixed_bits - floor) / unit)))
    j = first + int(np.argmin(best[first:]))  # the least error among files within the tolerance below bpw
    choices, spent = {}, floor
    for (name, cands), pick, cost in zip(reversed(options.items()), reversed(picks), reversed(costs)):
        k = int(pick[j])
        choices.update(dict.fromkeys(members[name], cands[k][0]))
        spent += cands[k][1] - cands[0][1]
        j -= cost[k]
    achieved = (spent + shapes.fixed_bits) / shapes.params
    if abs(achieved - bpw) > TOLERANCE:
        raise BudgetError(f"--bpw {bpw:g}: the nearest file this model allows is {achieved:.3f} bpw")
    return Decision(bpw, achieved, dict(sorted(choices.items())), scores, sensitivity)
