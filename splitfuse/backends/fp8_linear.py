"""FP8 weights through torch._scaled_mm, where a GPU multiplies float8 natively (compute capability
8.9 and up: Ada, Hopper and later); everywhere else the backend dequantizes (Backend.linear).

_scaled_mm multiplies two float8 matrices, so the activations are quantized too, per token (one
scale per row, max|x| / 448), as FP8 checkpoints with activation_scheme "dynamic" are meant to run.
That rounding is the difference from the weight-only reference (the dequantized matrix times x):
e4m3 keeps 3 mantissa bits, so each activation moves by up to 2**-4 relative, and a dot product
of K such terms by about 2**-4 / sqrt(K) of its magnitude.

The scaled-mm layout ("scaled_mm_fp8") keeps the float8 data [N, K] (its transpose is the
column-major operand _scaled_mm takes) and one float32 scale per output row as [1, N].
Nothing here touches a device API: the caller passes the device's compute capability.
"""

from __future__ import annotations

import dataclasses

import torch

from splitfuse.quant.weights import QuantizedWeight

LAYOUT = "scaled_mm_fp8"
MIN_CAPABILITY = (8, 9)  # the first GPUs with float8 tensor cores
FP8_MAX = 448.0  # the largest float8_e4m3fn
DIM_MULTIPLE = 16  # _scaled_mm takes K and N in multiples of 16
# row-wise scaled _scaled_mm writes bfloat16 only: weights of a bf16 model, bf16 activations
ACTIVATION_DTYPE = torch.bfloat16


def use_scaled_mm(weight: QuantizedWeight, capability: tuple[int, int] | None) -> bool:
    """Whether an "fp8" weight runs through _scaled_mm on a device of this compute capability (None:
    not a CUDA GPU): float8 tensor cores, a bfloat16 model, one scale per output row (block-wise
    scales dequantize), K and N multiples of 16, no activation quantizer of its own."""
    N, K = weight.shape
    return (weight.format == "fp8" and weight.layout == "rows" and capability is not None
            and weight.dtype == ACTIVATION_DTYPE
            and tuple(capability) >= MIN_CAPABILITY and getattr(weight, "input_quant", None) is None
            and weight.scales.numel() == N and K % DIM_MULTIPLE == 0 and N % DIM_MULTIPLE == 0)


def prepare(weight: QuantizedWeight) -> QuantizedWeight:
    """An fp8 weight with one scale per row -> the scaled-mm layout (see the module docstring)."""
    return dataclasses.replace(weight, scales=weight.scales.float().reshape(1, -1).contiguous(),
                               data=weight.data.contiguous(), layout=LAYOUT)


def _dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    return (weight.data.float() * weight.scales.reshape(-1, 1)).to(dtype)


QuantizedWeight.DEQUANTIZERS[LAYOUT] = _dequantize


def quantize_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, 1]): each row scaled to max|x| = 448."""
    scales = (x2d.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (x2d.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def scaled_mm_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T + bias for W in the scaled-mm layout, activations quantized per token."""
    if weight.layout != LAYOUT:
        raise ValueError(f"scaled_mm_linear: weight layout must be {LAYOUT!r} (fp8_linear.prepare), got {weight.layout!r}")
    if x.dtype != ACTIVATION_DTYPE:
        raise TypeError(f"scaled_mm_linear: x must be {ACTIVATION_DTYPE}, got {x.dtype}")
    N, K = weight.shape
    x2d = x.reshape(-1, K)
    x_fp8, x_scales = quantize_rows(x2d)
    out = torch._scaled_mm(x_fp8, weight.data.t(), scale_a=x_scales, scale_b=weight.scales, out_dtype=x.dtype)
    out = out.view(*x.shape[:-1], N)
    return out if bias is None else out + bias
