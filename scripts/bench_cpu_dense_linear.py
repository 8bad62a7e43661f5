#!/usr/bin/env python
"""GFLOP/s of torch's bf16 (or fp16) linear vs the cpu backend's dense linear (which picks torch's
matmul, the native streaming kernel or the fp32 upcast per call; see
splitfuse/backends/cpu/dense_linear.py), side by side on the demo model's and a 0.5B model's
weight shapes at several row counts. The two take turns call by call, so that a shared machine's
slow spells fall on both alike; each figure is the median of the repeats.

    python scripts/bench_cpu_dense_linear.py                      # 2 threads, every shape
    python scripts/bench_cpu_dense_linear.py --quick              # demo shapes, 1 and 32 rows
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from splitfuse.backends.cpu import dense_linear

# (name, N output features, K input features)
DEMO_SHAPES = (("demo down", 256, 768), ("demo qkv", 768, 256), ("demo gate_up", 1536, 256),
               ("demo lm_head", 4096, 256))
SHAPES_05B = (("0.5B qkv", 1152, 896), ("0.5B o", 896, 896), ("0.5B gate_up", 9728, 896),
              ("0.5B down", 896, 4864), ("0.5B lm_head", 32000, 896))
ROWS = (1, 8, 32, 256, 768)


def median_seconds(fns, repeats: int, budget_s: float) -> list[float]:
    """Median seconds per call of each function, called in turn `repeats` times (fewer when one
    round takes longer than budget_s / repeats), after one warm-up round."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=3.0, help="time per cell after which repeats stop")
    parser.add_argument("--quick", action="store_true", help="the demo shapes at 1 and 32 rows, 3 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes, rows, repeats = ((DEMO_SHAPES, [1, 32], 3) if args.quick else
                             (DEMO_SHAPES + SHAPES_05B, args.rows, args.repeats))
    print(f"{args.threads} threads, {args.dtype}; {dense_linear.describe(dtype)}")
    print(f"{'shape':<14} {'N x K':>12} {'M':>5}  {'torch GF/s':>10}  {'splitfuse GF/s':>14}  {'path':<7} {'speedup':>7}")
    gen = torch.Generator().manual_seed(0)
    for name, N, K in shapes:
        weight = (torch.randn(N, K, generator=gen) * K ** -0.5).to(dtype)
        for M in rows:
            x = torch.randn(M, K, generator=gen).to(dtype)
            torch_s, ours_s = median_seconds([lambda: F.linear(x, weight), lambda: dense_linear.linear(x, weight)],
                                             repeats, args.budget_s)
            gflop = 2 * M * N * K / 1e9
            print(f"{name:<14} {f'{N}x{K}':>12} {M:>5}  {gflop / torch_s:>10.1f}  {gflop / ours_s:>14.1f}  "
                  f"{dense_linear.choose(dtype, M):<7} {torch_s / ours_s:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
