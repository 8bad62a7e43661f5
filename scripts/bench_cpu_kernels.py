#!/usr/bin/env python
"""The cpu backend with its native kernels vs plain torch (SPLITFUSE_NATIVE=0), side by side.

Both engines run in this process on the embedded demo model, built once each; every workload is
timed --repeats times with the two engines alternating (which goes first alternates too), so load
from other processes hits both alike. Prints best and median wall time, the speed-up in wall time
and in process CPU time (steadier on a shared machine), and how many prompts gave identical tokens
(fp32: all; bf16 may differ at near-ties, the two paths round differently).

    python scripts/bench_cpu_kernels.py [--threads 1] [--repeats 5] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import splitfuse
from bench_offline import make_prompts, run_splitfuse
from bench_scheduler import cpu_model
from splitfuse.data import default_model_dir

WORKLOADS = {  # name: (prompts, shortest, longest, new tokens each)
    "offline 32 x (32-160) + 32": (32, 32, 160, 32),
    "decode-heavy 64 x 16 + 64": (64, 16, 16, 64),
    "long prompts 4 x (600-700) + 8": (4, 600, 700, 8),
}


def pipelines(model: str, dtype: str):
    """(plain torch, native kernels) engines of the cpu backend."""
    os.environ["SPLITFUSE_NATIVE"] = "0"
    try:
        plain = splitfuse.pipeline(model, backend="cpu", dtype=dtype)
    finally:
        del os.environ["SPLITFUSE_NATIVE"]
    return plain, splitfuse.pipeline(model, backend="cpu", dtype=dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = str(default_model_dir())
    print(f"{cpu_model()}, torch threads {args.threads}, {args.repeats} alternating runs per workload")
    for dtype in args.dtypes.split(","):
        engines = dict(zip(("plain", "native"), pipelines(model, dtype)))
        print(f"{dtype}: plain = {engines['plain'].engine.backend.describe()}, "
              f"native = {engines['native'].engine.backend.describe()}")
        for name, (n, shortest, longest, new) in WORKLOADS.items():
            prompts = make_prompts(n, shortest, longest, 512, seed=0)
            for pipe in engines.values():
                run_splitfuse(pipe, prompts[:2], 2)  # warm-up
            wall = {key: [] for key in engines}
            cpu = {key: [] for key in engines}
            tokens = {}
            for r in range(args.repeats):
                for key in (("plain", "native") if r % 2 == 0 else ("native", "plain")):
                    t0, c0 = time.perf_counter(), time.process_time()
                    tokens[key] = run_splitfuse(engines[key], prompts, new)
                    wall[key].append(time.perf_counter() - t0)
                    cpu[key].append(time.process_time() - c0)
            same = sum(a == b for a, b in zip(tokens["plain"], tokens["native"]))

            def ratio(times, pick):
                return pick(times["plain"]) / pick(times["native"])

            print(f"  {name:<32} plain {min(wall['plain']):.3f} s (median {statistics.median(wall['plain']):.3f})"
                  f"  native {min(wall['native']):.3f} s (median {statistics.median(wall['native']):.3f})"
                  f"  speed-up: wall {ratio(wall, min):.2f}x best / {ratio(wall, statistics.median):.2f}x median,"
                  f" cpu time {ratio(cpu, min):.2f}x / {ratio(cpu, statistics.median):.2f}x"
                  f"  identical tokens {same}/{n}", flush=True)


if __name__ == "__main__":
    main()
