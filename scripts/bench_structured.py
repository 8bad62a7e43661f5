"""Cost of constrained decoding, measured side by side in one process so machine noise hits both.

1. The grammar libraries (xgrammar and, when installed, llguidance) on one typical JSON schema with
   the model's tokenizer: compile time and the time to fill the allowed-token bitmasks of a batch.
2. The engine: a batch of JSON-schema requests against the same batch unconstrained, alternately;
   the median decode-step time of each (steps where the whole batch decodes) and their ratio.

    python scripts/bench_structured.py [MODEL] [--backend cpu] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import splitfuse
from splitfuse.config import SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}


def _walk(fill, accept, is_done, num_rows: int, vocab: int, steps: int, rng: random.Random) -> float:
    """Mean seconds to fill a batch's bitmasks, each row then taking a random allowed token."""
    total = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        bitmask = fill()
        total += time.perf_counter() - start
        for row in range(num_rows):
            if not is_done(row):
                words = bitmask[row].tolist()
                allowed = [t for t in range(vocab) if words[t // 32] >> (t % 32) & 1]
                accept(row, rng.choice(allowed))
    return total / steps


def bench_xgrammar(tokenizer, vocab: int, batch: int, steps: int) -> tuple[float, float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - start
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab)

    def fill():
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        return bitmask

    step_s = _walk(fill, lambda row, t: matchers[row].accept_token(t), lambda row: matchers[row].is_terminated(),
                   batch, vocab, steps, random.Random(0))
    return compile_s, step_s


def bench_llguidance(tokenizer, vocab: int, batch: int, steps: int) -> tuple[float, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                            defaults={"whitespace_flexible": False})
    matchers = [llguidance.LLMatcher(lltokenizer, grammar) for _ in range(batch)]
    compile_s = time.perf_counter() - start  # llguidance compiles lazily, per matcher
    bitmask = llguidance.torch.allocate_token_bitmask(batch, vocab)

    def fill():
        for row, matcher in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)
        return bitmask

    step_s = _walk(fill, lambda row, t: matchers[row].consume_token(t), lambda row: matchers[row].is_stopped(),
                   batch, vocab, steps, random.Random(0))
    return compile_s, step_s


def decode_step_times(engine, prompt_ids: list[int], params: SamplingParams, batch: int) -> list[float]:
    """Seconds of each step in which all `batch` requests decode (prefill steps left out)."""
    for _ in range(batch):
        engine.add_request(prompt_ids, params)
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        if len(outputs) == batch and all(o.new_token_ids for o in outputs) and engine.stats().waiting == 0:
            times.append(elapsed)
    return times[1:]  # the first full step also finishes prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model directory (default: the embedded demo model)")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24, help="decode steps per batch")
    parser.add_argument("--repeats", type=int, default=3, help="batches per kind, alternating")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (greedy) keeps sampling cheap, so the mask's share shows most")
    args = parser.parse_args()

    pipe = splitfuse.pipeline(args.model, backend=args.backend)
    engine, tokenizer = pipe.engine, pipe.tokenizer
    vocab = engine.model.vocab_size
    print(f"## grammar libraries: one JSON schema, bitmasks of a batch of {args.batch}, vocabulary {vocab}\n")
    print("| library | compile (ms) | mask fill per step (ms) |")
    print("|---|---:|---:|")
    for name, bench in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        try:
            compile_s, step_s = bench(tokenizer, vocab, args.batch, steps=30)
        except ImportError:
            print(f"| {name} | not installed | |")
            continue
        print(f"| {name} | {compile_s * 1e3:.1f} | {step_s * 1e3:.2f} |")

    start = time.perf_counter()
    engine.constraints.compiled(StructuredOutputsParams(json=SCHEMA))
    cold_ms = (time.perf_counter() - start) * 1e3
    print(f"\nengine compile of the schema (cold, tokenizer info included): {cold_ms:.1f} ms")

    prompt_ids = pipe.encode("A user record:")
    base = dict(temperature=args.temperature, max_new_tokens=args.new_tokens, seed=0)
    kinds = {"unconstrained": SamplingParams(ignore_eos=True, **base),
             "json schema": SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA), **base)}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):
        for kind in (list(kinds) if repeat % 2 == 0 else list(kinds)[::-1]):
            times[kind] += decode_step_times(engine, prompt_ids, kinds[kind], args.batch)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    print(f"\n## engine decode step, batch {args.batch}, backend {args.backend}, temperature {args.temperature}\n")
    print("| requests | median step (ms) | steps measured |")
    print("|---|---:|---:|")
    for kind, median in medians.items():
        print(f"| {kind} | {median * 1e3:.2f} | {len(times[kind])} |")
    print(f"\nconstrained / unconstrained step time: {medians['json schema'] / medians['unconstrained']:.3f}x")
    pipe.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
