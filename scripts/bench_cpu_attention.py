#!/usr/bin/env python
"""The cpu backend's native paged attention kernels (rows, register tiles, decode units) side by side.

Each case is one ragged step over a paged cache (prompt chunks, a chunk continuing a cached prefix,
batches of decodes) on the demo model's attention shape and on the 0.5B shape. The kernel paths
("rows": every unit row by row, the kernel before the tiles; "tiles": every unit with register
tiles; "decode": decodes as units of every kv head, the rest as auto; "auto": what the backend
runs, by each unit's shape) are timed in alternation, so load from other processes hits them alike;
with one thread the clock is the process's CPU time (steadier on a shared machine), else wall time.
Prints the best time of each, GFLOP/s (causal work: 4 * keys * D per query head and token), the
ratios rows / decode and rows / auto, plus the largest difference of auto from the rows path.
--cold evicts the caches before every run, as a model's step does between two layers' attention.

    python scripts/bench_cpu_attention.py [--threads 2] [--repeats 7] [--dtype float32] [--cold]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_scheduler import cpu_model
from splitfuse.backends.cpu import native_ops
from splitfuse.testing.ragged import filled_cache, ragged_step

SHAPES = {"demo (8/4 heads, D 32)": (8, 4, 32), "0.5B (14/2 heads, D 64)": (14, 2, 64)}
CASES = {  # name: [(context length incl. new tokens, new tokens) per sequence]
    "prefill 512": [(512, 512)],
    "prefill 3 prompts (768 tokens)": [(300, 300), (200, 200), (268, 268)],
    "chunk 256 after 344 cached": [(600, 256)],
    "decode 32 x ctx 300": [(300, 1)] * 32,
    "decode 8 x ctx 256": [(256, 1)] * 8,
    "decode 1 x ctx 256": [(256, 1)],
}
PATHS = ("rows", "tiles", "decode", "auto")
BLOCK_SIZE = 16
EVICT_BYTES = 256 << 20  # --cold: written before every run, well past any last-level cache


def causal_flops(specs: list[tuple[int, int]], num_heads: int, head_dim: int) -> int:
    """Multiply-adds of Q K^T and P V as flops: every new token sees its context up to itself."""
    keys = sum(ctx - new + i + 1 for ctx, new in specs for i in range(new))
    return 4 * keys * num_heads * head_dim


def time_paths(ops, q, kv, meta, scale, repeats: int, clock, evict: torch.Tensor | None) -> dict[str, float]:
    """Best time of each path, the paths alternating in every round; with `evict`, a buffer larger
    than the last-level cache is written before every run (untimed), so the K/V come from memory
    as in a model's step, where the other layers' weights pass through the caches in between."""
    best = dict.fromkeys(PATHS, float("inf"))
    for _ in range(repeats):
        for path in PATHS:
            if evict is not None:
                evict.add_(1.0)
            start = clock()
            ops.paged_attention(q, kv, meta, scale, None, None, path=path)
            best[path] = min(best[path], clock() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cold", action="store_true", help="evict the caches before every run (K/V from memory)")
    args = p.parse_args()
    evict = torch.zeros(EVICT_BYTES // 4) if args.cold else None
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ops = native_ops.load()
    if ops is None:
        raise SystemExit(f"the native kernels are not there: {native_ops.unavailable_reason()}")
    clock = time.process_time if args.threads == 1 else time.perf_counter
    print(f"{cpu_model()}, {args.dtype}, {args.threads} threads, best of {args.repeats} alternating runs "
          f"({'CPU' if args.threads == 1 else 'wall'} time), block size {BLOCK_SIZE}"
          f"{', cold caches' if args.cold else ''}")
    print(f"{'shape':26} {'case':32} {'rows ms':>8} {'tiles ms':>9} {'decode ms':>9} {'auto ms':>8} "
          f"{'auto GF/s':>9} {'rows/dec':>8} {'rows/auto':>9} {'max diff':>9}")
    for shape, (H, Hkv, D) in SHAPES.items():
        for case, specs in CASES.items():
            step = ragged_step(specs, BLOCK_SIZE)
            kv, _, _ = filled_cache(step, Hkv, D, dtype)
            q = torch.randn(step.meta.num_tokens, H, D, generator=torch.Generator().manual_seed(0)).to(dtype)
            scale = D ** -0.5
            rows = ops.paged_attention(q, kv, step.meta, scale, None, None, path="rows")
            diff = (ops.paged_attention(q, kv, step.meta, scale, None, None).float() - rows.float()).abs().max()
            best = time_paths(ops, q, kv, step.meta, scale, args.repeats, clock, evict)
            gflops = causal_flops(specs, H, D) / best["auto"] / 1e9
            print(f"{shape:26} {case:32} {best['rows'] * 1e3:8.2f} {best['tiles'] * 1e3:9.2f} "
                  f"{best['decode'] * 1e3:9.2f} {best['auto'] * 1e3:8.2f} {gflops:9.1f} "
                  f"{best['rows'] / best['decode']:8.2f} {best['rows'] / best['auto']:9.2f} {diff:9.2e}")


if __name__ == "__main__":
    main()
