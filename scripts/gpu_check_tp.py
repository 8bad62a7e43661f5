#!/usr/bin/env python
"""gpu_check.sh's tensor-parallel part (2 or more CUDA devices): a tiny random Llama's greedy
tokens over 2 ranks (NCCL) equal 1 rank's, with prompts over several steps; the wall time of both
runs. Writes JSON to argv[1]; exit status 1 when the tokens differ or a run fails. argv[2], the
backend (default cuda), lets it dry-run on the cpu: `python scripts/gpu_check_tp.py out.json cpu`."""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time

import splitfuse
from splitfuse.testing.tiny_model import make_tiny_model


def greedy(path: str, prompts: list[list[int]], size: int, backend: str) -> tuple[list[list[int]], float]:
    """(greedy tokens, seconds of the generate call) of a float32 pipeline over `size` ranks."""
    pipe = splitfuse.pipeline(path, backend=backend, dtype="float32", tensor_parallel_size=size, token_budget=32,
                              kv_block_size=16)
    try:
        start = time.perf_counter()
        tokens = [r.token_ids for r in pipe(prompts, max_new_tokens=32, temperature=0.0, ignore_eos=True)]
        return tokens, time.perf_counter() - start
    finally:
        pipe.close()


def main(out: str, backend: str = "cuda") -> int:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 40, 77, 120)]
    result: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(make_tiny_model(tmp, "llama", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4,
                                       intermediate_size=512))
            one, result["tp1_s"] = greedy(path, prompts, 1, backend)
            two, result["tp2_s"] = greedy(path, prompts, 2, backend)
        result["same_tokens"] = one == two
        result["first_difference"] = next((i for i, (a, b) in enumerate(zip(one, two)) if a != b), None)
    except Exception as exc:  # reported in the JSON: the check goes on to its summary
        result["error"] = f"{type(exc).__name__}: {exc}"
    print("tp:", result)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if result.get("same_tokens") else 1


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
