"""The cpu backend's dense bf16 / fp16 linear: the fastest correct product per call.

Where the CPU has native bf16 (fp16) dot products (AVX512-BF16 / AMX) torch's own matmul is fast
and runs. Elsewhere torch's half-precision GEMM is several times slower than its fp32 one, so
  - up to STREAM_MAX_ROWS rows of x (decode) the native streaming kernel
    (splitfuse.native._dense_linear) reads each weight value once and widens it in registers;
  - more rows (prompt chunks) upcast x and the weight to float32, multiply, and round back: the
    same fp32-accumulate-then-round a bf16 GEMM does. The weight is converted per call, in chunks
    of rows, so that no float32 copy of the model is kept (converting costs ~1-2% of such a GEMM);
  - without the native kernel, few rows run torch's matmul (converting the weight would dominate).
SPLITFUSE_CPU_DENSE_LINEAR=torch forces torch's matmul everywhere, to compare side by side.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from splitfuse import native

HALF_DTYPES = (torch.bfloat16, torch.float16)
# /proc/cpuinfo flags under which torch's matmul of that dtype runs on native dot products
NATIVE_MATMUL_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
ENV = "SPLITFUSE_CPU_DENSE_LINEAR"  # "auto" (default) or "torch"
MODULE = "dense_linear"
# Crossovers measured on an AVX2 EPYC with 1 and 2 threads (scripts/bench_cpu_dense_linear.py): the
# streaming kernel matches the fp32 GEMM plus the weight's conversion up to ~32-48 rows, and torch's
# bf16 GEMM loses to the upcast from ~8-16 rows on (the weight's conversion dominates below).
STREAM_MAX_ROWS = 32
UPCAST_MIN_ROWS = 16
UPCAST_CHUNK_VALUES = 1 << 21  # weight values converted at a time (8 MiB of float32)
# the streaming kernel runs smaller weights on one thread: tens of microseconds of work, where
# waking a second OpenMP thread on a busy machine can take milliseconds
STREAM_PARALLEL_MIN_VALUES = 1 << 19

TORCH, STREAM, UPCAST = "torch", "stream", "upcast"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (read once per process; empty where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_matmul(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool:
    """Whether torch's matmul of `dtype` runs on native dot products on this CPU (or one with `flags`)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_MATMUL_FLAGS.get(dtype, ()))


def forced_torch() -> bool:
    """Whether SPLITFUSE_CPU_DENSE_LINEAR=torch asks for torch's matmul everywhere."""
    value = os.environ.get(ENV, "auto")
    if value not in ("auto", "torch"):
        raise ValueError(f"{ENV} must be 'auto' or 'torch'; got {value!r}")
    return value == "torch"


def kernel():
    """splitfuse.native._dense_linear, or None (not built, or SPLITFUSE_NATIVE=0)."""
    return native.load(MODULE)


def choose(dtype: torch.dtype, rows: int, *, flags: frozenset[str] | None = None, has_kernel: bool | None = None,
           force_torch: bool | None = None) -> str:
    """Which path multiplies `rows` rows of x in `dtype`: TORCH, STREAM or UPCAST."""
    force_torch = forced_torch() if force_torch is None else force_torch
    if dtype not in HALF_DTYPES or force_torch or has_native_matmul(dtype, flags):
        return TORCH
    has_kernel = kernel() is not None if has_kernel is None else has_kernel
    if has_kernel:
        return STREAM if rows <= STREAM_MAX_ROWS else UPCAST
    return UPCAST if rows >= UPCAST_MIN_ROWS else TORCH


def describe(dtype: torch.dtype) -> str:
    """Which paths run `dtype` linears, in a few words."""
    name = str(dtype).removeprefix("torch.")
    if forced_torch():
        return f"{name} linear: torch's matmul ({ENV}=torch)"
    if has_native_matmul(dtype):
        return f"{name} linear: torch's matmul (native {name} dot products)"
    if kernel() is not None:
        return f"{name} linear: native streaming kernel up to {STREAM_MAX_ROWS} rows, fp32 upcast above"
    return f"{name} linear: torch's matmul below {UPCAST_MIN_ROWS} rows, fp32 upcast from there"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T + bias through the path `choose` picks for x's dtype and rows."""
    if x.dtype != weight.dtype or not x.is_cpu or x.numel() == 0 or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    path = choose(x.dtype, rows)
    if path == UPCAST:
        return upcast_linear(x, weight, bias)
    if path == STREAM and weight.is_contiguous():
        return stream_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """x as a contiguous [M, K]."""
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features; the weight expects {K}")
    return x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, K).contiguous()


def stream_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  vectorized: bool = True) -> torch.Tensor:
    """The native streaming kernel (x and a contiguous weight in bf16/fp16, M <= the kernel's limit);
    vectorized=False runs its portable loops."""
    N, K = weight.shape
    x2d = _rows(x, K)
    out = torch.empty(x.shape[:-1] + (N,), dtype=x.dtype)
    bias = None if bias is None else bias.contiguous()
    kernel().dense_linear(x2d.data_ptr(), native.DTYPE_CODES[x.dtype], x2d.shape[0], K, weight.data_ptr(),
                          native.DTYPE_CODES[weight.dtype], N, None if bias is None else bias.data_ptr(),
                          out.data_ptr(), torch.get_num_threads() if N * K >= STREAM_PARALLEL_MIN_VALUES else 1,
                          int(vectorized))
    return out


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  chunk_values: int = UPCAST_CHUNK_VALUES) -> torch.Tensor:
    """float32 product of x and the weight, rounded once to x's dtype; the weight is converted a
    chunk of rows at a time (at most `chunk_values` values), so no float32 copy of it stays."""
    N, K = weight.shape
    x32 = _rows(x, K).float()
    bias32 = None if bias is None else bias.float()
    step = max(1, chunk_values // K)
    if step >= N:
        return F.linear(x32, weight.float(), bias32).to(x.dtype).view(x.shape[:-1] + (N,))
    out = torch.empty(x32.shape[0], N, dtype=x.dtype)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        out[:, n0:n1] = F.linear(x32, weight[n0:n1].float(), None if bias32 is None else bias32[n0:n1])
    return out.view(x.shape[:-1] + (N,))
