"""Mixture-of-experts blocks with one ``nn.Linear`` per expert projection.

transformers (5.x) keeps a block's experts as two 3-D parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]). slim2gguf quantizes each expert's gate, up and
down projections as a linear of its own, so ``unfuse`` swaps that module for
``Experts``: the same routing and arithmetic, with every projection an ``nn.Linear``
named as the checkpoints name it (``mlp.experts.E.gate_proj``, Mixtral's ``w1``). Then
the pipeline's hooks see only the tokens the router sends to each expert, which is what
each expert's Hessian must come from, and loading, checkpoints and export treat an expert
like any other linear; llama.cpp's converter stacks them into one tensor per kind.

An expert that few calibration tokens reach would get a Hessian of low rank, fitted to a
handful of tokens. ``top_up`` therefore gives every expert linear at least as many
tokens' worth of curvature as it has inputs: its routed tokens first, then the average
over all calibration tokens as if the router had chosen it (an expert no token reaches
gets that average alone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .architectures import EXPERT_LINEARS, SUPPORTED_ARCHITECTURES


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its linears named as its checkpoint does."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inner: int, act: Callable, device: torch.device):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, inner, bias=False, device=device))
        self.add_module(up, nn.Linear(hidden, inner, bias=False, device=device))
        self.add_module(down, nn.Linear(inner, hidden, bias=False, device=device))
        self.act = act

    def linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return tuple(getattr(self, n) for n in self.names)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.linears()
        return down(self.act(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """A block's experts, called as transformers calls its fused experts module."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            slot, token = torch.where(top_k_index.T == e)  # transformers' order: by slot, then token
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def expert_names(model: nn.Module) -> tuple[str, str, str] | None:
    """The expert linears' names of a mixture-of-experts model (None for a dense one)."""
    family = SUPPORTED_ARCHITECTURES.get((getattr(model.config, "architectures", None) or [""])[0])
    return EXPERT_LINEARS.get(family) if family else None


def unfuse(model: nn.Module) -> nn.Module:
    """Replace every fused experts module of ``model`` by ``Experts`` (in place; weights
    copied, or left on the meta device where they are)."""
    names = expert_names(model)
    if names is None:
        return model
    for module_name, module in list(model.named_modules()):
        fused = getattr(module, "gate_up_proj", None)
        if not (isinstance(fused, nn.Parameter) and fused.dim() == 3):
            continue
        n_experts, two_inner, hidden = fused.shape
        inner = two_inner // 2
        experts = Experts(ExpertMLP(names, hidden, inner, module.act_fn, fused.device) for _ in range(n_experts))
        if not fused.is_meta:
            for e, expert in enumerate(experts):
                gate, up, down = expert.linears()
                gate.weight.data = fused.data[e, :inner].clone()
                up.weight.data = fused.data[e, inner:].clone()
                down.weight.data = module.down_proj.data[e].clone()
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent), attr, experts)
    return model


class ExpertInputs:
    """Records, while a block runs, the tokens entering each of its ``Experts`` (all of
    them, before routing): what ``top_up`` runs a rarely chosen expert on."""

    def __init__(self, layer: nn.Module, prefix: str):
        self.modules = {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, Experts)}
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in self.modules}
        self._handles: list[Any] = []

    def __enter__(self) -> ExpertInputs:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda _m, args, name=name: self.inputs[name].append(args[0])))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def min_tokens(lin: nn.Linear) -> int:
    """The routed tokens an expert linear needs before its Hessian can have full rank."""
    return lin.in_features


def top_up(recorded: ExpertInputs, collectors: dict[str, Any], new_collector: Callable[[nn.Linear], Any]) -> dict[str, int]:
    """Give every expert linear at least ``min_tokens`` tokens' worth of Hessian (see the
    module docstring); returns the routed token count of each linear that was topped up.

    ``collectors``: module name -> the pipeline's InputCollector (``h``, ``seen``,
    ``sample``, ``top_up(other, tokens)``); ``new_collector`` makes an empty one."""
    topped: dict[str, int] = {}
    for name, experts in recorded.modules.items():
        for e, expert in enumerate(experts):
            linears = {f"{name}.{e}.{n}": lin for n, lin in zip(expert.names, expert.linears())}
            short = {n: lin for n, lin in linears.items() if n in collectors and collectors[n].seen < min_tokens(lin)}
            if not short:
                continue
            every = {n: new_collector(lin) for n, lin in short.items()}
            handles = [lin.register_forward_hook(every[n]) for n, lin in short.items()]
            try:
                for x in recorded.inputs[name]:
                    expert(x)
            finally:
                for handle in handles:
                    handle.remove()
            for n, lin in short.items():
                topped[n] = collectors[n].seen
                collectors[n].top_up(every[n], min_tokens(lin))
    return topped
