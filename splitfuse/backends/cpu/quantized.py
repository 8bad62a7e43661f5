"""The cpu backend's weight-only kernels for QuantizedWeight.

With splitfuse's native kernels built (splitfuse.native._quant_linear), int8 and int4 matrices stay
in the portable "rows" layout with float32 scales and every product runs them (memory-bound
streaming for decode-sized inputs, dequantize-once tiles for prefill chunks). Without them, int8
rows go through torch's `_weight_int8pack_mm` and int4 through `_weight_int4pack_mm_for_cpu` on its
own packed layout ("cpu_int4pack"). Where no kernel takes a call (a torch build without them, a
shape or dtype outside what they take), callers fall back to the dequantizing reference
(torch_ops.linear)."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import torch

from splitfuse import native
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


def native_kernels():
    """splitfuse.native._quant_linear, or None (not built, or SPLITFUSE_NATIVE=0)."""
    return native.load("quant_linear")


def native_takes(weight: QuantizedWeight) -> bool:
    """Whether the native kernels can read this matrix (the portable layout, weight-only)."""
    if weight.layout != "rows" or weight.input_quant is not None or not weight.data.is_cpu:
        return False
    return weight.format == "int8" or (weight.format == "int4" and weight.group_size % 2 == 0)


def native_ready(weight: QuantizedWeight) -> QuantizedWeight:
    """The matrix as the native kernels read it: contiguous tensors, float32 scales."""
    if _is_native_ready(weight):
        return weight
    tensors = {"data": weight.data, "scales": weight.scales.float(), "zeros": weight.zeros}
    return dataclasses.replace(weight, **{name: t if t is None else t.contiguous() for name, t in tensors.items()})


def _is_native_ready(weight: QuantizedWeight) -> bool:
    return weight.scales.dtype == torch.float32 and all(
        t is None or t.is_contiguous() for t in (weight.data, weight.scales, weight.zeros))


def prepare_weight(weight: QuantizedWeight) -> QuantizedWeight:
    """The layout the cpu backend's kernels read: the native kernels' when they are built, else
    torch's (int4 repacked once here, int8 scales in the weight's dtype)."""
    if native_kernels() is not None and native_takes(weight):
        return native_ready(weight)
    return pack_int4_for_cpu(weight) if int4_packable(weight) else int8_kernel_ready(weight)


def native_int8_mm(x2d: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None, vectorized: bool = True) -> torch.Tensor:
    """x2d [M, K] @ (data int8 [N, K] * scales float32 [N, K / group_size] per group).T + bias, in
    x2d's dtype (all contiguous, bias in x2d's dtype); vectorized=False runs the portable loops."""
    return native_matmul(native_kernels(), "int8", x2d, data, scales, None, group_size, bias, vectorized)


def native_int4_mm(x2d: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, bias: torch.Tensor | None = None, vectorized: bool = True) -> torch.Tensor:
    """x2d [M, K] @ ((values of data - zeros) * scales per group).T + bias, in x2d's dtype: data uint8
    [N, K/2] (even k in the low nibble), scales float32 and zeros uint8 [N, K / group_size]."""
    return native_matmul(native_kernels(), "int4", x2d, data, scales, zeros, group_size, bias, vectorized)


@dataclasses.dataclass(frozen=True)
class NativeCall:
    """One matrix's arguments to its native kernel, worked out once: a decode step makes about a
    hundred quantized products, and each one's Python time adds to the step's."""

    format: str
    function: Callable  # the module's int8_linear or int4_linear
    weight_args: tuple  # (data, N, scales[, zeros], group_size): pointers and sizes, in the kernel's order
    shape: tuple[int, int]  # (N, K)


def native_call(kernels, format: str, data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, K: int) -> NativeCall:
    """The call into the native module (`kernels`) for these contiguous tensors (kept alive by the caller)."""
    N = data.shape[0]
    if format == "int8":
        return NativeCall(format, kernels.int8_linear, (data.data_ptr(), N, scales.data_ptr(), group_size), (N, K))
    return NativeCall(format, kernels.int4_linear, (data.data_ptr(), N, scales.data_ptr(), zeros.data_ptr(),
                                                    group_size), (N, K))


def run_native(call: NativeCall, x2d: torch.Tensor, bias: torch.Tensor | None, out_shape: tuple[int, ...],
               vectorized: bool = True) -> torch.Tensor:
    """x2d [M, K] (contiguous) through `call`, into a new tensor of out_shape (M * N values) in x2d's dtype."""
    out = torch.empty(out_shape, dtype=x2d.dtype)
    call.function(x2d.data_ptr(), native.DTYPE_CODES[x2d.dtype], x2d.shape[0], call.shape[1], *call.weight_args,
                  None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads(), int(vectorized))
    return out


def native_matmul(kernels, format: str, x2d: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor | None, group_size: int, bias: torch.Tensor | None,
                  vectorized: bool = True) -> torch.Tensor:
    """One call into the native module (`kernels`): the arguments as pointers and sizes."""
    call = native_call(kernels, format, data, scales, zeros, group_size, x2d.shape[1])
    return run_native(call, x2d, bias, (x2d.shape[0], data.shape[0]), vectorized)


# prepared matrix -> its NativeCall (the matrix holds the tensors the pointers point into)
_NATIVE_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _native_call_of(weight: QuantizedWeight) -> NativeCall | None:
    """The matrix's NativeCall (worked out on its first product), or None when the native kernels are
    off or cannot read this matrix as it is (not prepared by prepare_weight)."""
    if not native.enabled():
        return None
    call = _NATIVE_CALLS.get(weight)
    if call is None:
        kernels = native_kernels()
        if kernels is None or not (native_takes(weight) and _is_native_ready(weight)):
            return None
        call = _NATIVE_CALLS[weight] = native_call(kernels, weight.format, weight.data, weight.scales, weight.zeros,
                                                   weight.group_size, weight.shape[1])
    return call


def _native_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The native product, or None when no native kernel takes this matrix (see _native_call_of)."""
    call = _native_call_of(weight)
    if call is None:
        return None
    N, K = call.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features; the weight {weight} expects {K}")
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    x2d = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, K).contiguous()
    return run_native(call, x2d, bias, x.shape[:-1] + (N,))


def kernel_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias through a native or torch kernel, or None when no kernel takes this call."""
    if x.dtype not in KERNEL_DTYPES or x.numel() == 0 or not x.is_cpu:
        return None
    out = _native_linear(x, weight, bias)
    if out is not None:
        return out
    if (weight.format == "int8" and weight.layout == "rows" and has_int8_kernel()
            and weight.shape[1] % INT8_K_MULTIPLE == 0):
        mm = lambda x2d: torch._weight_int8pack_mm(x2d, weight.data, _scales_for(x2d, weight.scales))  # noqa: E731
    elif weight.layout == INT4_LAYOUT:
        mm = lambda x2d: _int4_mm(x2d, weight)  # noqa: E731
    else:
        return None
    out = mm(x.reshape(-1, x.shape[-1]).contiguous()).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias
