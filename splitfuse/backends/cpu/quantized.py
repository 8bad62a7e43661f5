"""torch's CPU weight-only kernels for QuantizedWeight: int8 rows through `_weight_int8pack_mm`,
int4 through `_weight_int4pack_mm_for_cpu` on its own packed layout ("cpu_int4pack"). Where this
torch build lacks them, or a shape or dtype is outside what they take, callers fall back to the
dequantizing reference (torch_ops.linear)."""

from __future__ import annotations

import dataclasses

import torch

from splitfuse.quant.weights import QuantizedWeight, unpack_int4

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_LAYOUT = "cpu_int4pack"
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel's qGroupSize accepts
INT4_N_MULTIPLE = 16  # the packing op tiles output rows by 16
# the int8 kernel reads K in vectors of 8 and crashes on a bf16 remainder (torch 2.13): held for all
INT8_K_MULTIPLE = 8


def has_int8_kernel() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def has_int4_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def int4_packable(weight: QuantizedWeight) -> bool:
    """Whether the int4 kernel can take this portable int4 matrix."""
    return (has_int4_kernel() and weight.format == "int4" and weight.layout == "rows"
            and weight.shape[0] % INT4_N_MULTIPLE == 0 and weight.group_size in INT4_GROUP_SIZES)


def pack_int4_for_cpu(weight: QuantizedWeight) -> QuantizedWeight:
    """The portable int4 layout -> the kernel's: packed data and qScaleAndZeros [K/g, N, 2] in the
    weight's dtype. The kernel computes (q - 8) * scale + zero, so zero = (8 - zero_point) * scale."""
    q = unpack_int4(weight.data).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales = weight.scales.float()
    offsets = (8 - weight.zeros.float()) * scales
    scale_and_zeros = torch.stack([scales.t(), offsets.t()], dim=-1).to(weight.dtype).contiguous()
    return dataclasses.replace(weight, data=packed, scales=scale_and_zeros, zeros=None, layout=INT4_LAYOUT)


def int8_kernel_ready(weight: QuantizedWeight) -> QuantizedWeight:
    """An int8 matrix with its scales in its float dtype: the kernel takes scales in the
    activations' dtype, and converting them at every call costs one copy per linear."""
    if weight.format != "int8" or weight.dtype not in KERNEL_DTYPES or weight.scales.dtype == weight.dtype:
        return weight
    return dataclasses.replace(weight, scales=weight.scales.to(weight.dtype))


def _scales_for(x2d: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return scales if scales.dtype == x2d.dtype else scales.to(x2d.dtype)


def _int4_mm(x2d: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, weight.data, weight.group_size,
                                                       _scales_for(x2d, weight.scales))


def dequantize_int4_for_cpu(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] of the kernel's layout: torch has no unpack op for it, and the kernel applied to the
    identity returns each dequantized column exactly (one non-zero product per output)."""
    eye = torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)
    return _int4_mm(eye, weight).t().to(dtype)


QuantizedWeight.DEQUANTIZERS[INT4_LAYOUT] = dequantize_int4_for_cpu


def kernel_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias through torch's kernel, or None when no kernel takes this call."""
    if x.dtype not in KERNEL_DTYPES or x.numel() == 0:
        return None
    if (weight.format == "int8" and weight.layout == "rows" and has_int8_kernel()
            and weight.shape[1] % INT8_K_MULTIPLE == 0):
        mm = lambda x2d: torch._weight_int8pack_mm(x2d, weight.data, _scales_for(x2d, weight.scales))  # noqa: E731
    elif weight.layout == INT4_LAYOUT:
        mm = lambda x2d: _int4_mm(x2d, weight)  # noqa: E731
    else:
        return None
    out = mm(x.reshape(-1, x.shape[-1]).contiguous()).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias
