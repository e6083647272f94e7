"""``nn.Linear`` replacement that keeps a SliM weight packed and runs the Triton kernels.

The weight stays in the GGUF byte format (docs/FORMAT.md); forward calls the fused
matmul (GEMV for a few tokens, tiled ``tl.dot`` for many), so a model evaluated this
way reads exactly the bytes that llama.cpp reads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from slim2gguf.format import SlimType

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    # Without a GPU the kernels run in Triton's interpreter (slow: small inputs only). The
    # flag must be set before Triton is first imported: its own jit helpers (tl.sum, ...)
    # are built then, and a GPU build of them fails inside the interpreted kernels.
    if "triton" in sys.modules:
        raise ImportError(
            "without a GPU the SliM Triton kernels run in Triton's CPU interpreter, which must be chosen "
            "before Triton is first imported: set TRITON_INTERPRET=1 (or import slim2gguf.triton_linear first)"
        )
    os.environ["TRITON_INTERPRET"] = "1"

from slim2gguf_kernels import SlimTensor, slim_matmul  # noqa: E402


class SlimLinear(nn.Module):
    """``y = x @ W^T + bias`` with W packed; the tensors are buffers, so ``.to()`` and
    ``state_dict`` carry them (``.half()`` converts only the bias)."""

    def __init__(self, weight: SlimTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.stype = weight.stype
        self.counts = weight.counts
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.register_buffer("packed", weight.packed)
        self.register_buffer("group_index", weight.group_index)
        self.register_buffer("group_word", weight.group_word)
        self.register_buffer("bias", bias)

    @classmethod
    def from_packed(
        cls,
        data: np.ndarray | torch.Tensor,
        stype: SlimType,
        in_features: int,
        bias: torch.Tensor | None = None,
    ) -> SlimLinear:
        """Validate packed rows (uint8 [out, row_bytes]) and wrap them; on the bias's
        device when there is one, else on the data's."""
        device = None if bias is None else bias.device
        return cls(SlimTensor.from_packed(data, stype, in_features, device=device), bias)

    def weight_tensor(self) -> SlimTensor:
        """The buffers as the kernels take them (cheap: no copies)."""
        return SlimTensor(self.packed, self.group_index, self.group_word, self.counts, self.stype, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = slim_matmul(x.reshape(-1, self.in_features), self.weight_tensor(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"type={self.stype.name}, bias={self.bias is not None}"
        )


def swap_linears(model: nn.Module, packed: Mapping[str, tuple[np.ndarray | torch.Tensor, SlimType]]) -> None:
    """Replace the ``nn.Linear`` modules named in ``packed`` by SlimLinear, in place.

    Each keeps its bias and device. Every entry is checked before any module is
    replaced, so a bad entry leaves the model untouched.
    """
    replacements = {}
    for name, (data, stype) in packed.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        bias = None if linear.bias is None else linear.bias.detach()
        slim = SlimLinear.from_packed(data, stype, linear.in_features, bias=bias)
        if slim.out_features != linear.out_features:
            raise ValueError(f"{name}: packed data has {slim.out_features} rows, the layer {linear.out_features}")
        replacements[name] = slim.to(linear.weight.device)
    for name, slim in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, slim)
