"""The row-normalisation kernel behind RMSNorm and LayerNorm, with the residual add fused in: one
read of x (and residual), one write of each output.

The two norms differ only in CENTER (LayerNorm subtracts the row mean, RMSNorm does not), in the
bias, and in how the weight is applied (rms_norm.py and layer_norm.py give the numerics):
- the residual sum is rounded to the input dtype, as `x + residual` is in torch;
- the row statistics run in float32 (LayerNorm's variance is taken around the mean: no
  cancellation), with IEEE-rounded division and sqrt as torch computes them (the GPU's defaults
  are approximate); the sums are tree reductions, torch's have its own order: ~1e-7 relative;
- CAST_BEFORE_WEIGHT (Llama's RMSNorm): the normalised row is rounded to the input dtype and then
  multiplied by the weight; otherwise the product (with weight_offset + weight when HAS_OFFSET,
  Gemma) and the bias are formed in float32 and rounded once.
Rows wider than one tile are processed BLOCK_N columns at a time in two (RMSNorm) or three
(LayerNorm) passes; later passes recompute the residual sum (same rounding) rather than re-read
it, so no program reads memory it wrote itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitfuse.backends.triton.common import (
    as_rows, check_device, check_floating, check_like, num_warps, rows_per_program,
)

# Widest row kept in registers in one tile; wider rows are processed in chunks.
MAX_BLOCK_N = 8192


@triton.jit
def _rstd(sum_sq, n_f, eps):
    """1 / sqrt(sum_sq / n + eps) with IEEE-rounded division and sqrt, as torch computes
    rsqrt(mean + eps)."""
    return tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sum_sq, n_f) + eps))


@triton.jit
def _load_tile(x_ptr, r_ptr, sum_ptr, rows, cols, mask, stride_x, stride_r, stride_sum,
               HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """A tile of x, or of x + residual rounded to the input dtype (written to sum_ptr when
    STORE_SUM); 0 where masked."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(sum_ptr + rows[:, None] * stride_sum + cols[None, :], x, mask=mask)
    return x


@triton.jit
def _centered(x, mean, mask, CENTER: tl.constexpr):
    """x in float32, less its row mean when CENTER (then 0 where masked, so sums skip padding)."""
    h = x.to(tl.float32)
    if CENTER:
        h = tl.where(mask, h - mean[:, None], 0.0)
    return h


@triton.jit
def _scale_and_store(h, rstd, x_dtype: tl.constexpr, w_ptr, b_ptr, out_ptr, rows, cols, mask, N, stride_out,
                     weight_offset, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr,
                     CAST_BEFORE_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Normalise a tile by its rows' rstd, apply weight and bias, store it in the output dtype."""
    y = h * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w = weight_offset + w
        if CAST_BEFORE_WEIGHT:
            y = w[None, :] * y.to(x_dtype).to(tl.float32)
        else:
            y = y * w[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, out_ptr, sum_ptr,
    M, N, N_F, stride_x, stride_r, stride_out, stride_sum, eps, weight_offset,
    CENTER: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)
    x_dtype = x_ptr.dtype.element_ty

    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < N)
        x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, cols, mask, stride_x, stride_r, stride_sum, HAS_RESIDUAL, True)
        h = x.to(tl.float32)
        if CENTER:
            mean = tl.math.div_rn(tl.sum(h, axis=1), N_F)
            h = tl.where(mask, h - mean[:, None], 0.0)
        rstd = _rstd(tl.sum(h * h, axis=1), N_F, eps)
        _scale_and_store(h, rstd, x_dtype, w_ptr, b_ptr, out_ptr, rows, cols, mask, N, stride_out, weight_offset,
                         HAS_WEIGHT, HAS_OFFSET, CAST_BEFORE_WEIGHT, HAS_BIAS)
    else:
        # the first pass over the row writes the residual sum: the mean's pass when there is one
        if CENTER:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, c, mask, stride_x, stride_r, stride_sum,
                               HAS_RESIDUAL, True)
                acc += x.to(tl.float32)
            mean = tl.math.div_rn(tl.sum(acc, axis=1), N_F)
        else:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, c, mask, stride_x, stride_r, stride_sum,
                           HAS_RESIDUAL, not CENTER)
            h = _centered(x, mean, mask, CENTER)
            acc += h * h
        rstd = _rstd(tl.sum(acc, axis=1), N_F, eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, c, mask, stride_x, stride_r, stride_sum,
                           HAS_RESIDUAL, False)
            _scale_and_store(_centered(x, mean, mask, CENTER), rstd, x_dtype, w_ptr, b_ptr, out_ptr, rows, c, mask,
                             N, stride_out, weight_offset, HAS_WEIGHT, HAS_OFFSET, CAST_BEFORE_WEIGHT, HAS_BIAS)


def check_args(op: str, x: torch.Tensor, residual: torch.Tensor | None, **vectors: torch.Tensor | None) -> None:
    """Weight/bias vectors of the hidden size, a residual like x, floating point, one device."""
    n = x.shape[-1] if x.dim() else 0
    for name, t in vectors.items():
        if t is not None and t.shape != (n,):
            raise ValueError(f"{op}: {name} shape {tuple(t.shape)} does not match hidden size {n}")
    if residual is not None:
        check_like(op, "residual", residual, "x", x)
    check_floating(op, x=x, residual=residual, **vectors)
    check_device(op, x.device, residual=residual, **vectors)


def normalize(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None, *, center: bool, out_dtype: torch.dtype, weight_offset: float = 0.0,
    cast_before_weight: bool = False, block_n: int | None = None,
):
    """Launch the kernel over the last dim of x [..., N]: the normed rows in out_dtype, and with a
    residual (normed, x + residual). block_n forces the column tile (a power of two; smaller than
    N selects the chunked path)."""
    N = x.shape[-1]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        return out if residual is None else (out, total)

    x2 = as_rows(x, N)
    M = x2.shape[0]
    r2 = as_rows(residual, N) if residual is not None else x2
    out2 = out.view(M, N)
    sum2 = total.view(M, N) if total is not None else out2
    w = weight.contiguous() if weight is not None else x2  # placeholders when absent (flags are off)
    b = bias.contiguous() if bias is not None else x2

    if block_n is None:
        block_n = min(triton.next_power_of_2(N), MAX_BLOCK_N)
    # small rows: several per program so each program moves >= ~4K elements
    block_m = rows_per_program(M, block_n, x.device, gpu_elements=4096, gpu_max_rows=16)
    warps = num_warps(x.device, min(16, max(4, block_m * block_n // 512)))  # ~16 elements per thread
    _norm_kernel[(triton.cdiv(M, block_m),)](
        x2, r2, w, b, out2, sum2,
        M, N, float(N), x2.stride(0), r2.stride(0), out2.stride(0), sum2.stride(0), float(eps), float(weight_offset),
        CENTER=center, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_OFFSET=bool(weight_offset), CAST_BEFORE_WEIGHT=cast_before_weight, HAS_BIAS=bias is not None,
        SINGLE_PASS=block_n >= N, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return out if residual is None else (out, total)
