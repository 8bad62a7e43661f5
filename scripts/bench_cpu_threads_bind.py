#!/usr/bin/env python
"""The cpu backend with its OpenMP threads pinned (--cpu-threads-bind) vs free, side by side.

Pinning lasts for a process's life, so each run is a fresh process (the demo model, an offline
workload, 2 threads by default), pinned and free alternating; prints each side's best and median
wall time and the ratio.

    python scripts/bench_cpu_threads_bind.py [--threads 2] [--repeats 4] [--bind auto] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, time, torch, splitfuse
from bench_offline import make_prompts, run_splitfuse
bind, dtype = sys.argv[1], sys.argv[2]
pipe = splitfuse.pipeline(None, backend="cpu", dtype=dtype, cpu_threads_bind=None if bind == "none" else bind)
prompts = make_prompts(32, 32, 160, 512, seed=0)
run_splitfuse(pipe, prompts[:2], 2)
t0 = time.perf_counter()
run_splitfuse(pipe, prompts, 32)
print(time.perf_counter() - t0)
"""


def run(bind: str, dtype: str, threads: int) -> float:
    here = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CHILD, bind, dtype], env=env, capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--bind", default="auto", help="the pinned side's cpu_threads_bind (default auto)")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    times: dict[str, list[float]] = {"none": [], args.bind: []}
    for r in range(args.repeats):
        for side in (("none", args.bind) if r % 2 == 0 else (args.bind, "none")):
            times[side].append(run(side, args.dtype, args.threads))
    free, pinned = times["none"], times[args.bind]
    print(f"{args.dtype}, {args.threads} threads, 32 prompts x (32-160) + 32, {args.repeats} alternating runs: "
          f"free {min(free):.3f} s (median {statistics.median(free):.3f}), pinned ({args.bind}) {min(pinned):.3f} s "
          f"(median {statistics.median(pinned):.3f}); free/pinned {min(free) / min(pinned):.2f}x best, "
          f"{statistics.median(free) / statistics.median(pinned):.2f}x median")


if __name__ == "__main__":
    main()
