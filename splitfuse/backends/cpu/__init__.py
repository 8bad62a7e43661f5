"""The cpu backend: the plain-torch reference ops, KV cache sized by `kv_cache_gib`; quantized
weights through torch's CPU weight-only kernels (see quantized.py)."""

from __future__ import annotations

import torch

from splitfuse.backends import torch_ops
from splitfuse.backends.base import Backend
from splitfuse.backends.cpu.quantized import kernel_linear, prepare_weight
from splitfuse.quant.weights import QuantizedWeight


class CpuBackend(Backend):
    name = "cpu"
    priority = 0  # every other backend is preferred by `auto`
    dtypes = (torch.float32, torch.bfloat16)
    quantized_formats = ("int8", "int4")

    def linear(self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, QuantizedWeight):
            out = kernel_linear(x, weight, bias)
            if out is not None:
                return out
        return torch_ops.linear(x, weight, bias)

    def prepare_linear_weight(self, weight: QuantizedWeight) -> QuantizedWeight:
        return prepare_weight(weight)

    def describe(self) -> str:
        return f"cpu ({torch.get_num_threads()} threads)"


__all__ = ["CpuBackend"]
