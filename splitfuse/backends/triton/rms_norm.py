"""RMSNorm with the residual add fused in: one read of x (and residual), one write of each output.

Numerics follow torch_ops.rms_norm (HF LlamaRMSNorm / Gemma2RMSNorm): the residual sum is rounded
to the input dtype, the mean of squares and the scaling run in float32, and then
- weight_offset == 0 (Llama): the normalised row is cast to the input dtype first and multiplied by
  the weight (the product rounded to the promoted dtype of weight and input, as torch does);
- weight_offset != 0 (Gemma): h * (offset + weight) in float32, cast once at the end.
The only difference from the reference is the order of the float32 sum of squares (a tree
reduction here; torch sums in its own blocked order): about 1e-7 relative in float32. Division and
sqrt of the row statistic are IEEE-rounded, as in torch, not the GPU's approximate defaults.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Widest row kept in registers in one tile; wider rows are processed in chunks (two passes).
_MAX_BLOCK_N = 8192


@triton.jit
def _rstd(sum_sq, n_f, eps):
    """1 / sqrt(sum_sq / n + eps) with IEEE-rounded division and sqrt, as torch computes
    rsqrt(mean + eps) (the GPU's default division and sqrt are approximate)."""
    return tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sum_sq, n_f) + eps))


@triton.jit
def _load_tile(x_ptr, r_ptr, sum_ptr, rows, cols, mask, stride_x, stride_r, stride_sum,
               HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """A tile of x, or of x + residual rounded to the input dtype as `x + residual` is in torch
    (written to sum_ptr when STORE_SUM)."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(sum_ptr + rows[:, None] * stride_sum + cols[None, :], x, mask=mask)
    return x


@triton.jit
def _scale_and_store(x, rstd, w_ptr, out_ptr, rows, cols, mask, N, stride_out, weight_offset,
                     HAS_OFFSET: tl.constexpr):
    """Normalise a tile by its rows' rstd, apply the weight (Llama or Gemma order), store it."""
    h = x.to(tl.float32) * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        y = h * (weight_offset + w)[None, :]
    else:
        y = w[None, :] * h.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr,
    M, N, N_F, stride_x, stride_r, stride_out, stride_sum,
    eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < N)
        x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, cols, mask, stride_x, stride_r, stride_sum,
                       HAS_RESIDUAL, True)
        h = x.to(tl.float32)
        rstd = _rstd(tl.sum(h * h, axis=1), N_F, eps)
        _scale_and_store(x, rstd, w_ptr, out_ptr, rows, cols, mask, N, stride_out, weight_offset, HAS_OFFSET)
    else:
        # pass 1: residual sum (written out) and the sum of squares, BLOCK_N columns at a time
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, c, mask, stride_x, stride_r, stride_sum,
                           HAS_RESIDUAL, True)
            h = x.to(tl.float32)
            acc += h * h
        rstd = _rstd(tl.sum(acc, axis=1), N_F, eps)
        # pass 2: normalise; the sum is recomputed (same rounding) rather than re-read, so no
        # program reads memory it wrote itself
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, c, mask, stride_x, stride_r, stride_sum,
                           HAS_RESIDUAL, False)
            _scale_and_store(x, rstd, w_ptr, out_ptr, rows, c, mask, N, stride_out, weight_offset, HAS_OFFSET)


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[M, n] view (a copy only when the rows cannot be viewed) with unit column stride."""
    rows = t.reshape(-1, n)
    return rows if n <= 1 or rows.stride(1) == 1 else rows.contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    weight_offset: float = 0.0, block_n: int | None = None,
):
    """RMSNorm over the last dim of x [..., N] (of x + residual, returning (normed, x + residual)).

    block_n forces the column tile (a power of two; smaller than N selects the two-pass path)."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {N}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
        if residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    for t in (x, weight) + ((residual,) if residual is not None else ()):
        if not t.is_floating_point():
            raise TypeError(f"rms_norm: expected floating-point tensors, got {t.dtype}")
        if t.device != x.device:
            raise ValueError("rms_norm: all tensors must be on the same device")
    weight = weight.contiguous()
    # Llama casts then scales in the promoted dtype; Gemma casts the float32 product to x's dtype
    out_dtype = x.dtype if weight_offset else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        return out if residual is None else (out, total)

    x2 = _as_rows(x, N)
    M = x2.shape[0]
    r2 = _as_rows(residual, N) if residual is not None else x2
    out2 = out.view(M, N)
    sum2 = total.view(M, N) if total is not None else out2

    if block_n is None:
        block_n = min(triton.next_power_of_2(N), _MAX_BLOCK_N)
    single = block_n >= N
    if x.device.type == "cpu":  # the Triton interpreter (TRITON_INTERPRET=1)
        # the interpreter pays per program, not per element: many rows per program
        block_m = max(1, min(triton.next_power_of_2(M), 16384 // block_n))
        num_warps = 1
    else:
        # small rows: several per program so each program moves >= ~4K elements
        block_m = max(1, min(16, 4096 // block_n))
        num_warps = min(16, max(4, block_m * block_n // 512))  # ~16 elements per thread
    grid = (triton.cdiv(M, block_m),)
    _rms_norm_kernel[grid](
        x2, r2, weight, out2, sum2,
        M, N, float(N), x2.stride(0), r2.stride(0), out2.stride(0), sum2.stride(0),
        float(eps), float(weight_offset),
        HAS_RESIDUAL=residual is not None, HAS_OFFSET=bool(weight_offset), SINGLE_PASS=single,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out if residual is None else (out, total)
