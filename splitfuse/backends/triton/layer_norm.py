"""LayerNorm with the residual add fused in: one read of x (and residual), one write of each output.

Numerics follow torch_ops.layer_norm (F.layer_norm after `x + residual`): the residual sum is
rounded to the input dtype, mean and variance (biased, of x - mean: two passes, no cancellation)
run in float32, then (x - mean) * rstd * weight + bias in float32, rounded once to the input
dtype. Against torch only the order of the float32 sums differs (tree reductions here), about
1e-7 relative in float32; division and sqrt of the row statistics are IEEE-rounded, as in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest row kept in registers in one tile; wider rows are processed in chunks (three passes).
_MAX_BLOCK_N = 8192


@triton.jit
def _load_tile(x_ptr, r_ptr, sum_ptr, rows, cols, mask, stride_x, stride_r, stride_sum,
               HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """A float32 tile of x, or of x + residual rounded to the input dtype as torch rounds it
    (written to sum_ptr when STORE_SUM); 0 where masked."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(sum_ptr + rows[:, None] * stride_sum + cols[None, :], x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _normalize_and_store(x, mean, rstd, w_ptr, b_ptr, out_ptr, rows, cols, mask, N, stride_out,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = (x - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, out_ptr, sum_ptr,
    M, N, N_F, stride_x, stride_r, stride_out, stride_sum, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols[None, :] < N)
        x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, cols, mask, stride_x, stride_r, stride_sum, HAS_RESIDUAL, True)
        mean = tl.math.div_rn(tl.sum(x, axis=1), N_F)
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(d * d, axis=1), N_F) + eps))
        _normalize_and_store(x, mean, rstd, w_ptr, b_ptr, out_ptr, rows, cols, mask, N, stride_out,
                             HAS_WEIGHT, HAS_BIAS)
    else:
        # pass 1: residual sum (written out) and the mean; passes 2 and 3 recompute the sum (same
        # rounding) rather than re-read it, so no program reads memory it wrote itself
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            acc += _load_tile(x_ptr, r_ptr, sum_ptr, rows, c, mask, stride_x, stride_r, stride_sum,
                              HAS_RESIDUAL, True)
        mean = tl.math.div_rn(tl.sum(acc, axis=1), N_F)
        # pass 2: variance around the mean
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, c, mask, stride_x, stride_r, stride_sum,
                           HAS_RESIDUAL, False)
            d = tl.where(mask, x - mean[:, None], 0.0)
            acc += d * d
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(acc, axis=1), N_F) + eps))
        # pass 3: normalise
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = _load_tile(x_ptr, r_ptr, sum_ptr, rows, c, mask, stride_x, stride_r, stride_sum,
                           HAS_RESIDUAL, False)
            _normalize_and_store(x, mean, rstd, w_ptr, b_ptr, out_ptr, rows, c, mask, N, stride_out,
                                 HAS_WEIGHT, HAS_BIAS)


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[M, n] view (a copy only when the rows cannot be viewed) with unit column stride."""
    rows = t.reshape(-1, n)
    return rows if n <= 1 or rows.stride(1) == 1 else rows.contiguous()


def _check(x: torch.Tensor, weight, bias, residual) -> None:
    N = x.shape[-1] if x.dim() else 0
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"layer_norm: {name} shape {tuple(t.shape)} does not match hidden size {N}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"layer_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
        if residual.dtype != x.dtype:
            raise ValueError(f"layer_norm: residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    for t in (x, weight, bias, residual):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"layer_norm: expected floating-point tensors, got {t.dtype}")
        if t.device != x.device:
            raise ValueError("layer_norm: all tensors must be on the same device")


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None = None, block_n: int | None = None,
):
    """LayerNorm over the last dim of x [..., N] (of x + residual, returning (normed, x + residual)).

    block_n forces the column tile (a power of two; smaller than N selects the chunked path)."""
    _check(x, weight, bias, residual)
    N = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        return out if residual is None else (out, total)

    x2 = _as_rows(x, N)
    M = x2.shape[0]
    r2 = _as_rows(residual, N) if residual is not None else x2
    out2 = out.view(M, N)
    sum2 = total.view(M, N) if total is not None else out2
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2

    if block_n is None:
        block_n = min(triton.next_power_of_2(N), _MAX_BLOCK_N)
    if x.device.type == "cpu":  # the Triton interpreter (TRITON_INTERPRET=1)
        # the interpreter pays per program, not per element: many rows per program
        block_m = max(1, min(triton.next_power_of_2(M), 16384 // block_n))
        num_warps = 1
    else:
        # small rows: several per program so each program moves >= ~4K elements
        block_m = max(1, min(16, 4096 // block_n))
        num_warps = min(16, max(4, block_m * block_n // 512))  # ~16 elements per thread
    _layer_norm_kernel[(triton.cdiv(M, block_m),)](
        x2, r2, w, b, out2, sum2,
        M, N, float(N), x2.stride(0), r2.stride(0), out2.stride(0), sum2.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        SINGLE_PASS=block_n >= N, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out if residual is None else (out, total)
