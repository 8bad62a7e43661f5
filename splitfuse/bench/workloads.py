"""Benchmark workloads: prompts as random token ids (or from a file) with a generation length each."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class BenchRequest:
    """One request of a workload: prompt ids (and text when it came from a file) and tokens to generate."""

    prompt_ids: list[int]
    gen_len: int
    prompt_text: str | None = None
    clipped: bool = False  # its prompt or generation was shortened to fit the model's max length


def normal_lengths(rng: np.random.Generator, n: int, mean: int, variance: float, low: int, high: int) -> list[int]:
    """n lengths ~ Normal(mean, variance x mean) as FastGen draws them ("30% variance" = std 0.3 x mean),
    rounded and clamped to [low, high]."""
    if mean < 1:
        raise ValueError(f"mean length must be at least 1, got {mean}")
    if variance < 0:
        raise ValueError(f"--variance must be >= 0, got {variance}")
    draws = rng.normal(mean, variance * mean, size=n)
    return [int(min(max(round(x), low), high)) for x in draws]


def random_ids(rng: np.random.Generator, n: int, vocab_size: int, exclude: set[int]) -> list[int]:
    """n token ids drawn uniformly from the vocabulary, special ids excluded."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
    return rng.choice(allowed, size=n).tolist()


def synthetic(num: int, prompt_len: int, gen_len: int, variance: float, max_len: int, vocab_size: int,
              seed: int, exclude: set[int] = frozenset(), shared_prefix_len: int = 0) -> list[BenchRequest]:
    """FastGen's workload: prompt and generation lengths ~ normal (variance 0 gives fixed lengths),
    clamped so each length is >= 1 and prompt + generation <= max_len.

    shared_prefix_len N: every prompt starts with the same N random tokens (a system prompt, few-shot
    examples) followed by its own prompt_len-distributed suffix."""
    if shared_prefix_len < 0:
        raise ValueError(f"--shared-prefix-len must be >= 0, got {shared_prefix_len}")
    if max_len - shared_prefix_len < 2:
        raise ValueError(f"--shared-prefix-len {shared_prefix_len} leaves no room for a suffix and a generated "
                         f"token in the model's max length {max_len}")
    rng = np.random.default_rng(seed)
    prefix = random_ids(rng, shared_prefix_len, vocab_size, exclude) if shared_prefix_len else []
    room = max_len - shared_prefix_len
    # drawn unbounded above, then fitted to the room left, so a request can say it was shortened
    unbounded = 2**62
    drawn_gens = normal_lengths(rng, num, gen_len, variance, 1, unbounded)
    gens = [min(g, room - 1) for g in drawn_gens]
    drawn_prompts = [normal_lengths(rng, 1, prompt_len, variance, 1, unbounded)[0] for _ in gens]
    prompts = [min(p, room - g) for p, g in zip(drawn_prompts, gens)]
    return [BenchRequest(prefix + random_ids(rng, p, vocab_size, exclude), g, clipped=(p, g) != (dp, dg))
            for p, g, dp, dg in zip(prompts, gens, drawn_prompts, drawn_gens)]


def from_file(path: str | Path, gen_len: int, variance: float, max_len: int, seed: int, tokenizer) -> list[BenchRequest]:
    """Prompts from a file: JSONL with a "prompt" (text or token ids) and optional "max_tokens" per line,
    or plain text with one prompt per line. Prompts too long for max_len are cut from the left."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file: no such file {path}")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"--prompts-file: {path} holds no prompts")
    rng = np.random.default_rng(seed)
    as_json = path.suffix == ".jsonl" or lines[0].lstrip().startswith("{")
    requests = []
    for number, line in enumerate(lines, start=1):
        want = None
        if as_json:
            try:
                item = json.loads(line)
                prompt, want = item["prompt"], item.get("max_tokens")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--prompts-file: line {number} of {path} is not a JSON object with a "
                                 "\"prompt\"") from None
        else:
            prompt = line
        text = prompt if isinstance(prompt, str) else None
        if text is not None:
            if tokenizer is None:
                raise ValueError("--prompts-file with text prompts needs a tokenizer (--tokenizer DIR)")
            ids = tokenizer(text)["input_ids"]
        else:
            ids = [int(i) for i in prompt]
        asked = int(want) if want is not None else normal_lengths(rng, 1, gen_len, variance, 1, 2**62)[0]
        gen = min(max(asked, 1), max_len - 1)
        clipped = gen < asked
        if len(ids) + gen > max_len:
            ids, text, clipped = ids[-(max_len - gen):], None, True
        requests.append(BenchRequest(ids, gen, text, clipped))
    return requests


def as_text(requests: list[BenchRequest], tokenizer) -> list[str]:
    """Prompt text for servers that take text: the file's text, else the decoded random ids."""
    if tokenizer is None:
        raise ValueError("sending text prompts needs a tokenizer (--tokenizer DIR), or send token ids (--send-ids)")
    return [r.prompt_text if r.prompt_text is not None else tokenizer.decode(r.prompt_ids) for r in requests]
