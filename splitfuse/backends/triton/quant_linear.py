"""Weight-only quantized linear layers: dequantize-GEMM kernels W8A16 (int8, one scale per output
channel) and W4A16 (int4 in groups along K with integer zero points), x [M, K] @ W.T -> [M, N].

Each weight tile is read once as integers, dequantized in registers and multiplied in the
activations' dtype with float32 accumulation, so a decode step moves 1/2 (int8) or about 1/4
(int4) of the bf16 weight bytes. `prepare` repacks a portable QuantizedWeight at load into the
K-major layouts the kernels read (consecutive output features adjacent, so a tile's loads are
contiguous along N):
- "triton_int8": data int8 [K, N], scales float32 [N];
- "triton_int4": data uint8 [K/2, N] (byte kh holds k = 2kh in the low nibble, 2kh + 1 in the
  high one), scales float32 [K/group_size, N], zeros uint8 [K/group_size, N].
A decode step's narrow matrices give fewer output tiles than a GPU has multiprocessors; K is then
cut into slices summed by separate programs, their float32 sums added with torch (deterministic,
no atomics). Numerics follow torch_ops.linear: the weight is dequantized in float32 ((q - zero) * scale, or
q * scale), rounded to the activations' dtype, and multiplied with float32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from splitfuse.backends.triton.common import num_warps
from splitfuse.quant.weights import QuantizedWeight

INT8_LAYOUT = "triton_int8"
INT4_LAYOUT = "triton_int4"
LAYOUTS = (INT8_LAYOUT, INT4_LAYOUT)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _dequant_gemm_kernel(
    x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K, group_size, kh_per_split,
    stride_xm, stride_om,
    INT4: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr,
):
    # The K loop steps over pairs of input features (kh = k // 2): int4 holds a pair per byte, and
    # int8 reads the pair's two rows; the even and odd halves each make one tl.dot. Program
    # (m, n, s) sums the pairs [s * kh_per_split, (s + 1) * kh_per_split), a multiple of BLOCK_KH;
    # with PARTIAL it writes that float32 sum to out_ptr[s] for the host to add up (split K).
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kh_begin = pid_s * kh_per_split
    for kh0 in range(kh_begin, tl.minimum(kh_begin + kh_per_split, tl.cdiv(K, 2)), BLOCK_KH):
        khs = kh0 + tl.arange(0, BLOCK_KH).to(tl.int64)
        k_even = 2 * khs
        even_ok = k_even < K
        odd_ok = k_even + 1 < K
        x_row = x_ptr + rows[:, None] * stride_xm
        x_even = tl.load(x_row + k_even[None, :], mask=row_ok[:, None] & even_ok[None, :], other=0.0)
        x_odd = tl.load(x_row + k_even[None, :] + 1, mask=row_ok[:, None] & odd_ok[None, :], other=0.0)
        tile_ok = even_ok[:, None] & col_ok[None, :]
        if INT4:
            packed = tl.load(w_ptr + khs[:, None] * N + cols[None, :], mask=tile_ok, other=0).to(tl.int32)
            # both halves of a byte lie in one group: group_size is even
            g_off = (k_even // group_size)[:, None] * N + cols[None, :]
            scale = tl.load(scales_ptr + g_off, mask=tile_ok, other=0.0)
            zero = tl.load(zeros_ptr + g_off, mask=tile_ok, other=0).to(tl.float32)
            w_even = ((packed & 15).to(tl.float32) - zero) * scale
            w_odd = ((packed >> 4).to(tl.float32) - zero) * scale
        else:
            scale = tl.load(scales_ptr + cols, mask=col_ok, other=0.0)[None, :]
            w_even = tl.load(w_ptr + k_even[:, None] * N + cols[None, :], mask=tile_ok, other=0).to(tl.float32) * scale
            w_odd = tl.load(w_ptr + (k_even[:, None] + 1) * N + cols[None, :],
                            mask=odd_ok[:, None] & col_ok[None, :], other=0).to(tl.float32) * scale
        # the reference rounds the dequantized matrix to the activations' dtype before the matmul
        w_even = w_even.to(dtype)
        w_odd = w_odd.to(dtype)
        if UPCAST:
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
            w_even, w_odd = w_even.to(tl.float32), w_odd.to(tl.float32)
        acc = tl.dot(x_even, w_even, acc, input_precision=PRECISION)
        acc = tl.dot(x_odd, w_odd, acc, input_precision=PRECISION)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_s * M * N + rows[:, None] * N + cols[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:  # added to the float32 sum, rounded once (as addmm does)
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(dtype), mask=out_mask)


# ---- layouts ------------------------------------------------------------------------------------
def supports(weight: QuantizedWeight) -> bool:
    """Whether `prepare` repacks this weight for the kernels (portable int8 or int4, no activation
    quantization)."""
    return (weight.layout == "rows" and weight.format in ("int8", "int4")
            and getattr(weight, "input_quant", None) is None)


def prepare(weight: QuantizedWeight) -> QuantizedWeight:
    """The portable layout -> the kernels' K-major layout (see the module docstring); other weights
    are returned unchanged."""
    if not supports(weight):
        return weight
    if weight.format == "int8":
        return dataclasses.replace(weight, data=weight.data.t().contiguous(), scales=weight.scales.float().contiguous(),
                                   layout=INT8_LAYOUT)
    # the portable bytes [N, K/2] already pair k = 2kh (low) with 2kh + 1 (high): transposed they
    # are the kernel's [K/2, N]
    return dataclasses.replace(weight, data=weight.data.t().contiguous(), scales=weight.scales.float().t().contiguous(),
                               zeros=weight.zeros.t().contiguous(), layout=INT4_LAYOUT)


def to_portable(weight: QuantizedWeight) -> QuantizedWeight:
    """The kernels' layout -> the portable one (exact: the same integers, scales and zeros)."""
    if weight.layout == INT8_LAYOUT:
        return dataclasses.replace(weight, data=weight.data.t().contiguous(), layout="rows")
    return dataclasses.replace(weight, data=weight.data.t().contiguous(), scales=weight.scales.t().contiguous(),
                               zeros=weight.zeros.t().contiguous(), layout="rows")


def _dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    return to_portable(weight).dequantize(dtype)


for _layout in LAYOUTS:
    QuantizedWeight.DEQUANTIZERS[_layout] = _dequantize


# ---- host wrapper -------------------------------------------------------------------------------
@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(programs: int, kh_tiles: int, device: torch.device) -> int:
    """How many slices K is cut into: enough programs to fill the GPU twice over when the output
    tiles alone are fewer than its multiprocessors (a decode step's 4096-wide matrices), each slice
    at least 4 tiles of K long; 1 in the interpreter."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device)
    if programs >= sms:
        return 1
    return max(1, min(8, triton.cdiv(2 * sms, programs), kh_tiles // 4))


def quant_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None,
                 split_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ W.T + bias for W in a layout `prepare` made -> [..., N] in x's dtype.

    split_k forces how many slices K is summed in (their float32 sums are added on the host side
    with torch); by default the GPU's size decides (see _split_k)."""
    if weight.layout not in LAYOUTS:
        raise ValueError(f"quant_linear: weight layout must be one of {LAYOUTS} (QuantizedWeight from "
                         f"quant_linear.prepare), got {weight.layout!r}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"quant_linear: x must be one of {ACTIVATION_DTYPES}, got {x.dtype}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"quant_linear: x has {x.shape[-1]} input features, the weight expects K={K}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"quant_linear: bias must be [N={N}], got {tuple(bias.shape)}")
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    M = x2d.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    on_cpu = x.device.type == "cpu"
    if on_cpu:  # the Triton interpreter pays per program and per loop step: few, large tiles
        block_m = min(64, max(16, triton.next_power_of_2(M)))
        block_n = min(128, max(16, triton.next_power_of_2(N)))
        block_kh = min(64, max(16, triton.next_power_of_2(triton.cdiv(K, 2))))
    else:  # tl.dot needs at least 16 rows; decode batches are padded to them by the row mask
        block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
        # narrower column tiles when few row tiles: a decode step's 4096-wide matrix still spreads
        # over more programs than an H100 has SMs (132)
        block_n = 64 if triton.cdiv(M, block_m) * triton.cdiv(N, 64) >= 256 else 32
        block_kh = 32
    # the interpreter's dot mishandles 16-bit floats: it gets float32 copies of the same values;
    # float32 multiplies in IEEE float32, not TF32 (16-bit operands ignore the precision)
    upcast = on_cpu and x.dtype != torch.float32
    precision = "ieee" if upcast or x.dtype == torch.float32 else "tf32"
    is_int4 = weight.layout == INT4_LAYOUT
    zeros = weight.zeros if is_int4 else weight.scales  # unused by the int8 kernel
    tiles = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    kh_tiles = triton.cdiv(triton.cdiv(K, 2), block_kh)
    split = split_k or _split_k(tiles[0] * tiles[1], kh_tiles, x.device)
    kh_per_split = triton.cdiv(kh_tiles, split) * block_kh
    split = triton.cdiv(triton.cdiv(K, 2), kh_per_split)  # no empty slice
    target = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    _dequant_gemm_kernel[(*tiles, split)](
        x2d, weight.data, weight.scales, zeros, bias if bias is not None else out, target, M, N, K, weight.group_size,
        kh_per_split, x2d.stride(0), out.stride(0),
        INT4=is_int4, HAS_BIAS=bias is not None, PARTIAL=split > 1, PRECISION=precision, UPCAST=upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KH=block_kh, num_warps=num_warps(x.device, 4),
    )
    if split > 1:
        total = target.sum(dim=0)
        out = (total if bias is None else total + bias.float()).to(x.dtype)
    return out.view(*x.shape[:-1], N)
