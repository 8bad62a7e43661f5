#!/usr/bin/env python
"""Greedy vs sampled: the sampler alone and whole decode steps, at batch 32 and 256.

Sampled rows use temperature 0.8 with top-p 0.95, top-k 50 or both (a mix, as a server sees), each
row with its own seed. Greedy and sampled are timed side by side in one run, interleaved, and the
ratio sampled / greedy (median of the repeats) is what to read: absolute times on a shared machine
are noise. With the native kernels built, both are timed twice: native kernels on, and off
(SPLITFUSE_NATIVE=0, the torch path), each ratio within its own setting.

    python scripts/bench_sampling.py                     # sampler at vocab 32000, steps on the demo model
    python scripts/bench_sampling.py --batches 32 --repeats 3 --steps 4   # quick check
    python scripts/bench_sampling.py --backend cuda --vocab 128256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import torch

import splitfuse
from splitfuse import native
from splitfuse.config import SamplingParams
from splitfuse.core.sampler import SamplingBatch

# what is timed: (sampled rows?, native kernels on?)
KINDS = {"greedy": (False, True), "sampled": (True, True), "greedy, off": (False, False), "sampled, off": (True, False)}


@contextmanager
def native_kernels(on: bool):
    """Native kernels on or off (SPLITFUSE_NATIVE) for the duration."""
    before = os.environ.get("SPLITFUSE_NATIVE")
    os.environ["SPLITFUSE_NATIVE"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["SPLITFUSE_NATIVE"]
        else:
            os.environ["SPLITFUSE_NATIVE"] = before


def settings(batch: int, sampled: bool) -> dict:
    """Per-row sampling settings: all greedy, or a mix of top-p, top-k and both."""
    if not sampled:
        return {"temperature": [0.0] * batch, "top_k": [0] * batch, "top_p": [1.0] * batch}
    mix = [(0, 0.95), (50, 1.0), (50, 0.95)]
    return {"temperature": [0.8] * batch, "top_k": [mix[i % 3][0] for i in range(batch)],
            "top_p": [mix[i % 3][1] for i in range(batch)]}


def sampler_batch(batch: int, sampled: bool, draw: int) -> SamplingBatch:
    s = settings(batch, sampled)
    return SamplingBatch(s["temperature"], s["top_k"], s["top_p"],
                         seeds=[1000 + i if sampled else None for i in range(batch)], counters=[draw] * batch,
                         suppressed=[[] for _ in range(batch)])


def time_sampler(backend, batch: int, vocab: int, repeats: int, kinds: dict) -> dict[str, float]:
    """Median seconds of backend.sample on random logits [batch, vocab], per kind."""
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)).mul_(3).to(backend.device)
    times = {kind: [] for kind in kinds}
    for draw in range(repeats + 1):  # the first round warms up
        for kind, (sampled, on) in kinds.items():
            spec = sampler_batch(batch, sampled, draw)
            backend.synchronize() if hasattr(backend, "synchronize") else None
            with native_kernels(on):
                start = time.perf_counter()
                backend.sample(logits, spec).tolist()  # .tolist(): wait for the result, as the engine does
                if draw:
                    times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(values) for kind, values in times.items()}


def time_steps(pipe, batch: int, steps: int, repeats: int, kinds: dict) -> dict[str, float]:
    """Median seconds of one decode step with `batch` running requests, per kind."""
    engine = pipe.engine
    times = {kind: [] for kind in kinds}
    for round_ in range(repeats + 1):
        for kind, (sampled, on) in kinds.items():
            s = settings(batch, sampled)
            ids = [engine.add_request([5 + i % 50, 17, 99, 250], SamplingParams(
                max_new_tokens=steps + 4, ignore_eos=True, temperature=s["temperature"][i], top_k=s["top_k"][i],
                top_p=s["top_p"][i], seed=i)) for i in range(batch)]
            while engine.stats().waiting or any(engine.requests[r].num_generated == 0 for r in ids):
                engine.step()  # prompts in, every request decoding
            with native_kernels(on):
                start = time.perf_counter()
                for _ in range(steps):
                    engine.step()
            if round_:
                times[kind].append((time.perf_counter() - start) / steps)
            for request_id in ids:
                engine.abort(request_id)
    return {kind: statistics.median(values) for kind, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory for the step timings (default: demo model)")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--batches", default="32,256", help="comma-separated batch sizes")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the sampler-only timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    pipe = splitfuse.pipeline(args.model, backend=args.backend, max_seqs=max(batches), token_budget=max(768, max(batches)))
    backend = pipe.engine.backend
    kinds = dict(KINDS)
    if args.backend != "cpu" or native.load("sampling") is None:
        del kinds["greedy, off"], kinds["sampled, off"]  # nothing native to compare against
    print(f"backend {backend.describe()}; torch threads {torch.get_num_threads()}; native sampling: "
          f"{native.unavailable_reason('sampling') or 'on'}")
    header = f"{'what':<28}{'batch':>6}{'greedy ms':>12}{'sampled ms':>12}{'sampled / greedy':>18}"
    if "sampled, off" in kinds:
        header += f"{'off: greedy ms':>16}{'sampled ms':>12}{'sampled / greedy':>18}"
    print(header)
    for batch in batches:
        for what, result in ((f"sampler (vocab {args.vocab})",
                              time_sampler(backend, batch, args.vocab, args.repeats, kinds)),
                             (f"decode step (vocab {pipe.engine.model.vocab_size})",
                              time_steps(pipe, batch, args.steps, args.repeats, kinds))):
            g, s = result["greedy"], result["sampled"]
            line = f"{what:<28}{batch:>6}{g * 1e3:>12.2f}{s * 1e3:>12.2f}{s / g:>18.2f}"
            if "sampled, off" in result:
                g, s = result["greedy, off"], result["sampled, off"]
                line += f"{g * 1e3:>16.2f}{s * 1e3:>12.2f}{s / g:>18.2f}"
            print(line, flush=True)
    pipe.close()


if __name__ == "__main__":
    main()
