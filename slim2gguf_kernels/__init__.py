"""Triton kernels that read SliM packed tensors (docs/FORMAT.md) directly.

On a machine without CUDA, set TRITON_INTERPRET=1 before the first import to run them
on CPU tensors through Triton's interpreter.
"""

from .dequant import dequantize
from .layout import GroupTable, SlimTensor, read_table
from .matmul import GEMV_MAX_TOKENS, slim_matmul

__all__ = ["GEMV_MAX_TOKENS", "GroupTable", "SlimTensor", "dequantize", "read_table", "slim_matmul"]
