"""Offline A/B of prefix caching: one engine with it on, one with it off, run alternately in one
process on the same prompts, so machine noise hits both alike.

Two workloads: `distinct` prompts share no tokens (caching can only cost: its hashing and block
bookkeeping), `shared` prompts start with one common prefix (caching skips computing it). Prints
the median wall time of each engine per workload and the ratio on / off.

    python scripts/bench_prefix_caching.py [MODEL] [--backend cpu] [--repeats 6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import splitfuse


def workload(kind: str, rng: random.Random, args) -> list[list[int]]:
    def tokens(n: int) -> list[int]:
        return [rng.randrange(5, args.vocab) for _ in range(n)]

    if kind == "distinct":
        return [tokens(rng.randint(args.prompt_len * 3 // 4, args.prompt_len * 5 // 4)) for _ in range(args.prompts)]
    prefix = tokens(args.prefix_len)
    return [prefix + tokens(args.suffix_len) for _ in range(args.prompts)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model directory (default: the embedded demo model)")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per batch")
    parser.add_argument("--prompt-len", type=int, default=256, help="distinct: mean prompt tokens")
    parser.add_argument("--prefix-len", type=int, default=768, help="shared: common prefix tokens")
    parser.add_argument("--suffix-len", type=int, default=32, help="shared: each prompt's own tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6, help="batches per engine and workload")
    parser.add_argument("--vocab", type=int, default=4000, help="prompt ids are drawn below this")
    args = parser.parse_args()

    pipes = {on: splitfuse.pipeline(args.model, backend=args.backend, enable_prefix_caching=on) for on in (True, False)}
    rng = random.Random(0)
    print("| workload | caching on (s) | caching off (s) | on / off | prompt tokens from the cache (on) |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("distinct", "shared"):
        times: dict[bool, list[float]] = {True: [], False: []}
        cached = 0
        for repeat in range(args.repeats):
            prompts = workload(kind, rng, args)  # fresh prompts: a repeat finds nothing of the last
            for on in (True, False) if repeat % 2 == 0 else (False, True):
                start = time.perf_counter()
                responses = pipes[on](prompts, max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
                times[on].append(time.perf_counter() - start)
                if on:
                    cached += sum(r.num_cached_tokens for r in responses)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        total = sum(len(p) for p in prompts) * args.repeats
        print(f"| {kind} | {on:.3f} | {off:.3f} | {on / off:.3f} | {cached / total:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
