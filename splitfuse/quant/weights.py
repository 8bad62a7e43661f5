"""Quantized weight matrices: the object `Backend.linear` accepts in place of a tensor, and the
weight-only quantizers that make one from a float matrix.

Formats (weight [N, K]: N output features, K input features):
- "int8": int8 data [N, K], one symmetric scale per output row: w = data * scale.
- "int4": values 0..15 in groups of `group_size` along K, one scale and one integer zero point per
  group (asymmetric, as GPTQ/AWQ W4A16): w = (q - zero) * scale. Portable layout: two values per
  byte [N, K/2] uint8, even k in the low nibble. A backend may repack into its kernel's layout
  (`Backend.prepare_linear_weight`), recorded in `layout`.
- "fp8": float8_e4m3fn data [N, K], float32 scales [N, ceil(K / group_size)]: w = data * scale
  (per channel: group_size = K; block-wise checkpoints repeat each block's scale over its rows).
  No torch CPU kernel multiplies float8: the reference dequantizes to the compute dtype.
`input_quant`, when set, fake-quantizes the activations before the matmul (W8A8 checkpoints).
`dequantize()` is the reference every kernel is checked against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch

from splitfuse.quant.activations import InputQuantizer

FORMATS = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (128, 64, 32)  # preferred first: the largest that divides K
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight-only quantized [N, K] matrix: packed data, scales, zero points and how to read them."""

    format: str  # "int8" | "int4" | "fp8"
    data: torch.Tensor  # int8 [N, K]; int4 "rows": uint8 [N, K/2]; other layouts: the backend's own
    scales: torch.Tensor  # int8: [N]; int4 "rows": [N, K / group_size] float32
    zeros: torch.Tensor | None  # int4 "rows": uint8 [N, K / group_size]; int8: None
    group_size: int  # input features sharing one scale (int8: K, the whole row)
    shape: tuple[int, int]  # (N, K) of the float matrix
    dtype: torch.dtype  # the float dtype it was quantized from; dequantize() gives this by default
    layout: str = "rows"  # "rows" = the portable layout above; else a backend's (see DEQUANTIZERS)
    input_quant: InputQuantizer | None = None  # activations quantized before the matmul (W8A8), or None

    # layout -> function(weight, dtype) -> [N, K]; backends that repack register their layout here
    DEQUANTIZERS: ClassVar[dict[str, Callable[["QuantizedWeight", torch.dtype], torch.Tensor]]] = {}

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held: packed data, scales and zero points."""
        tensors = (self.data, self.scales, self.zeros)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float matrix [N, K] this object stands for (computed in float32, returned in dtype)."""
        dtype = dtype or self.dtype
        if self.layout != "rows":
            return self.DEQUANTIZERS[self.layout](self, dtype)
        if self.format == "int8":
            return (self.data.float() * self.scales.float()[:, None]).to(dtype)
        if self.format == "fp8":
            scales = self.scales.float().repeat_interleave(self.group_size, dim=1)[:, :self.shape[1]]
            return (self.data.float() * scales).to(dtype)
        q = unpack_int4(self.data).float()
        zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)
        scales = self.scales.float().repeat_interleave(self.group_size, dim=1)
        return ((q - zeros) * scales).to(dtype)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, data=move(self.data), scales=move(self.scales), zeros=move(self.zeros))

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.format}, shape={self.shape}, group_size={self.group_size}, "
                f"layout={self.layout!r}, {self.nbytes} bytes)")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [N, K] (K even) -> uint8 [N, K/2], even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> values 0..15 [N, K] (uint8)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1)


def int4_group_size(in_features: int) -> int:
    """128 when it divides K, else 64 or 32; a K none of them divides (tiny or odd widths) is one
    group per row, so every row still gets its own scale."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), in_features)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-channel int8: scale = max|row| / 127, data in [-127, 127]."""
    w = _check_matrix(weight).float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    data = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", data, scales, None, w.shape[1], tuple(w.shape), weight.dtype)


def quantize_int4(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Asymmetric group-wise int4 (min/max per group of `group_size` along K; default
    int4_group_size(K)); the zero point is the integer that 0.0 maps to, so zeros stay exact."""
    w = _check_matrix(weight).float()
    N, K = w.shape
    group_size = group_size or int4_group_size(K)
    if K % group_size or K % 2:
        raise ValueError(f"int4 quantization needs an even in_features divisible by group_size; got "
                         f"in_features={K}, group_size={group_size}")
    groups = w.view(N, K // group_size, group_size)
    low = groups.amin(dim=2).clamp_max(0)  # include 0 so that zero weights stay exactly zero
    high = groups.amax(dim=2).clamp_min(0)
    scales = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    zeros = torch.round(-low / scales).clamp(0, 15)
    q = (torch.round(groups / scales[..., None]) + zeros[..., None]).clamp(0, 15).view(N, K)
    return QuantizedWeight("int4", pack_int4(q), scales, zeros.to(torch.uint8), group_size, (N, K), weight.dtype)


def quantize_fp8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-channel float8_e4m3fn: scale = max|row| / 448 (the format's largest value)."""
    w = _check_matrix(weight).float()
    scales = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    data = (w / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight("fp8", data, scales, None, w.shape[1], tuple(w.shape), weight.dtype)


QUANTIZERS: dict[str, Callable[[torch.Tensor], QuantizedWeight]] = {
    "int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}


def quantize(weight: torch.Tensor, format: str) -> QuantizedWeight:
    """`weight` [N, K] quantized to `format` ("int8", "int4" or "fp8") on its own device."""
    if format not in QUANTIZERS:
        raise ValueError(f"quantization format {format!r} is not supported; expected one of {list(QUANTIZERS)}")
    return QUANTIZERS[format](weight)


def _check_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"only floating-point 2-D weight matrices are quantized; got {weight.dim()}-D "
                         f"{weight.dtype}")
    return weight
