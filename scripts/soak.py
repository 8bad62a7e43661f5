"""Soak any OpenAI-compatible server with mixed requests and print a summary.

    python scripts/soak.py --url http://127.0.0.1:8000 --requests 5000

Completions and chat, streamed or not, n > 1, stop strings, clients that leave early; then a sample
of the answered requests is sent again one at a time and must get the same greedy answer. Exits 1
on any unexpected error, hang or differing answer."""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx

from splitfuse.testing.soak import check_alone, make_specs, soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as hung")
    parser.add_argument("--check", type=int, default=100, help="answered requests to send again alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)

    specs = make_specs(args.requests, seed=args.seed)
    result = asyncio.run(soak(args.url, specs, args.concurrency, args.timeout, args.api_key))
    asyncio.run(check_alone(args.url, specs, result, args.check, args.seed, args.api_key))
    print(result.summary())
    for line in (result.errors + result.mismatches)[:20]:
        print("  " + line)
    try:
        health = httpx.get(args.url + "/health", timeout=10).json()
        print(f"after the soak: running {health.get('running')}, waiting {health.get('waiting')}, KV blocks used "
              f"{health.get('kv_blocks_used')} of {health.get('kv_blocks_total')}, preemptions "
              f"{health.get('preemptions')}")
    except (httpx.HTTPError, ValueError) as exc:
        print(f"/health did not answer: {exc}")
    return 1 if result.errors or result.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
