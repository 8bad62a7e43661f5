"""Micro-benchmark: host time per step of scheduling and KV block bookkeeping, no model.

256 sequences decode together (block size 16, contexts of a few hundred tokens). Each timed step
is what the engine does around a forward pass: schedule() (which also allocates KV blocks),
build_batch() for the same plan, then the post-step update (count tokens as computed, append the
sampled token, register newly full blocks). The three are timed separately, once with prefix
caching off and once on (prompts share no tokens, so "on" costs only its bookkeeping), and the
ratio is printed. Prints a Markdown section for docs/benchmarks.md.

    python scripts/bench_scheduler.py [--seqs 256] [--steps 2000]

Target: schedule() + post-step update <= 300 us per step, so the host never holds up a decode
step of a GPU (a few ms).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch

from splitfuse.core.batch import build_batch
from splitfuse.testing.sim import Simulator


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def decoding_simulator(args, rng: random.Random, prefix_caching: bool) -> Simulator:
    """A simulator whose sequences have all finished their prompts and now only decode. Prompts
    share no tokens, so prefix caching only adds its bookkeeping (hashing and registering blocks)."""
    longest = args.max_prompt + args.steps_per_round + 2
    num_blocks = args.seqs * -(-longest // args.block_size) + 64  # never short of KV: no preemption
    sim = Simulator(args.token_budget, args.seqs, num_blocks, args.block_size, enable_prefix_caching=prefix_caching)
    for _ in range(args.seqs):
        # Room for the whole round, so nobody finishes and the batch stays at args.seqs decodes.
        sim.add_request(rng.randint(args.min_prompt, args.max_prompt), max_new_tokens=args.steps_per_round + 2,
                        shared_len=0)
    # Prefill (untimed) in one step, so no sequence decodes ahead of the others and all contexts
    # stay at prompt length + what the round adds.
    sched = sim.scheduler
    sched.token_budget = args.seqs * args.max_prompt
    sim.step()
    sched.token_budget = args.token_budget
    assert not sched.waiting and all(seq.num_uncomputed == 1 for seq in sched.running)
    return sim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--min-prompt", type=int, default=128)
    parser.add_argument("--max-prompt", type=int, default=384)
    parser.add_argument("--steps", type=int, default=2000, help="timed steps in all")
    parser.add_argument("--steps-per-round", type=int, default=250,
                        help="steps before a fresh set of sequences, so contexts stay a few hundred tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.token_budget < args.seqs:
        parser.error("--token-budget must be >= --seqs so every sequence decodes in every step")

    print(f"### Scheduler micro-benchmark ({datetime.date.today().isoformat()})\n")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
          f"torch {torch.__version__}")
    medians = {}
    for prefix_caching in (False, True):
        medians[prefix_caching] = run(args, prefix_caching)
    off, on = medians[False], medians[True]
    print(f"\nschedule + update with prefix caching on / off: {on:.0f} / {off:.0f} µs = {on / off:.3f}x")
    return 0


def run(args, prefix_caching: bool) -> float:
    """Time the steps with prefix caching on or off; print the table; return the median of
    schedule + update."""
    rng = random.Random(args.seed)  # the same sequences in both modes
    schedule_us: list[float] = []
    update_us: list[float] = []
    batch_us: list[float] = []
    contexts: list[int] = []
    done = 0
    while done < args.steps:
        sim = decoding_simulator(args, rng, prefix_caching)
        for _ in range(min(args.steps_per_round, args.steps - done)):
            t0 = time.perf_counter_ns()
            plan = sim.schedule()
            t1 = time.perf_counter_ns()
            build_batch(plan, args.block_size)
            t2 = time.perf_counter_ns()
            sim.complete(plan)
            t3 = time.perf_counter_ns()
            if len(plan.items) != args.seqs or plan.preempted:
                raise RuntimeError("benchmark setup is wrong: expected every sequence to decode every step")
            schedule_us.append((t1 - t0) / 1e3)
            batch_us.append((t2 - t1) / 1e3)
            update_us.append((t3 - t2) / 1e3)
            contexts.extend(seq.num_computed for seq in sim.scheduler.running[:: max(1, args.seqs // 8)])
            done += 1

    both = [a + b for a, b in zip(schedule_us, update_us)]
    rows = [
        ("schedule() incl. KV block allocation", schedule_us),
        ("post-step update (Scheduler.apply: tokens, finishing, caching full blocks)", update_us),
        ("schedule + update (target <= 300 us)", both),
        ("build_batch() for the same plan", batch_us),
    ]
    print(f"\n- prefix caching {'on' if prefix_caching else 'off'}: {args.seqs} decoding sequences, block size "
          f"{args.block_size}, token budget {args.token_budget}, contexts {min(contexts)}-{max(contexts)} tokens, "
          f"{len(both)} timed steps (`python scripts/bench_scheduler.py`)\n")
    print("| per step | median µs | p90 µs |")
    print("|---|---:|---:|")
    for name, values in rows:
        print(f"| {name} | {statistics.median(values):.0f} | {percentile(values, 0.9):.0f} |")
    return statistics.median(both)


if __name__ == "__main__":
    sys.exit(main())
