"""A soak of an OpenAI-compatible server: many mixed requests at once (completions and chat,
streamed or not, n > 1, stop strings, clients that leave early), then a check that each greedy
answer equals the same request sent alone. Used by tests/reliability and scripts/soak.py."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

_WORDS = "the quick brown fox jumps over a lazy dog while seven tired ravens sing about rivers".split()


@dataclass(frozen=True)
class Spec:
    """One request of the soak."""

    chat: bool
    stream: bool
    n: int
    max_tokens: int
    prompt: str
    stop: tuple[str, ...] = ()
    leave_early: bool = False  # the client disconnects: after the first event, or before any reply

    def body(self) -> dict:
        body = {"max_tokens": self.max_tokens, "n": self.n, "temperature": 0, "stream": self.stream}
        if self.stop:
            body["stop"] = list(self.stop)
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


@dataclass
class SoakResult:
    outcomes: Counter = field(default_factory=Counter)  # "ok", "left" (intended), "error", "hang"
    errors: list[str] = field(default_factory=list)
    texts: dict[int, list[str]] = field(default_factory=dict)  # spec index -> text of each choice
    mismatches: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    def summary(self) -> str:
        lat = sorted(self.latencies_s) or [0.0]
        return (f"{sum(self.outcomes.values())} requests in {self.elapsed_s:.1f} s: " +
                ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) +
                f"; p50 {lat[len(lat) // 2]:.2f} s, p99 {lat[int(len(lat) * 0.99)]:.2f} s; "
                f"{len(self.mismatches)} answers differ from the same request alone")


def make_specs(count: int, seed: int = 0, leave_fraction: float = 0.1) -> list[Spec]:
    """count mixed requests, reproducible from seed."""
    rng = random.Random(seed)
    specs = []
    for _ in range(count):
        prompt = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 12)))
        specs.append(Spec(chat=rng.random() < 0.4, stream=rng.random() < 0.5, n=rng.choice((1, 1, 1, 2, 3)),
                          max_tokens=rng.randint(2, 40), prompt=prompt,
                          stop=(rng.choice(("e", " t", "\n", "s")),) if rng.random() < 0.3 else (),
                          leave_early=rng.random() < leave_fraction))
    return specs


async def _one(http: httpx.AsyncClient, spec: Spec) -> list[str] | None:
    """Each choice's text; None when the client left early on purpose; raises on an unexpected error."""
    if spec.leave_early and not spec.stream:
        try:
            await http.post(spec.path, json=spec.body(), timeout=0.05)
        except httpx.TimeoutException:
            return None
        return None  # answered before the client gave up: fine too
    texts = [""] * spec.n
    if not spec.stream:
        reply = await http.post(spec.path, json=spec.body())
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:200]}")
        for choice in reply.json()["choices"]:
            texts[choice["index"]] = choice["message"]["content"] if spec.chat else choice["text"]
        return texts
    async with http.stream("POST", spec.path, json=spec.body()) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return texts
            if spec.leave_early:
                return None
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            for choice in event["choices"]:
                piece = (choice["delta"].get("content") or "") if spec.chat else choice["text"]
                texts[choice["index"]] += piece
    raise RuntimeError("the stream ended without [DONE]")


async def soak(url: str, specs: list[Spec], concurrency: int = 32, timeout_s: float = 60.0,
               api_key: str | None = None) -> SoakResult:
    """Send every spec, at most `concurrency` at once; a request past timeout_s counts as a hang."""
    result = SoakResult()
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def run(http: httpx.AsyncClient, index: int, spec: Spec) -> None:
        async with gate:
            start = time.perf_counter()
            try:
                texts = await asyncio.wait_for(_one(http, spec), timeout_s)
            except asyncio.TimeoutError:
                result.outcomes["hang"] += 1
                result.errors.append(f"request {index} took over {timeout_s} s: {spec}")
                return
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                result.outcomes["error"] += 1
                result.errors.append(f"request {index}: {type(exc).__name__}: {exc}")
                return
            result.latencies_s.append(time.perf_counter() - start)
            if texts is None:
                result.outcomes["left"] += 1
            else:
                result.outcomes["ok"] += 1
                result.texts[index] = texts

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout_s) as http:
        await asyncio.gather(*(run(http, i, spec) for i, spec in enumerate(specs)))
    result.elapsed_s = time.perf_counter() - start
    return result


async def check_alone(url: str, specs: list[Spec], result: SoakResult, sample: int, seed: int = 0,
                      api_key: str | None = None) -> None:
    """Send up to `sample` answered specs again, one at a time; each differing answer is a mismatch."""
    answered = sorted(result.texts)
    chosen = random.Random(seed).sample(answered, min(sample, len(answered)))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        for index in sorted(chosen):
            spec = specs[index]
            alone = await _one(http, Spec(spec.chat, spec.stream, spec.n, spec.max_tokens, spec.prompt, spec.stop))
            if alone != result.texts[index]:
                result.mismatches.append(f"request {index}: in the soak {result.texts[index]!r}, alone {alone!r}")
