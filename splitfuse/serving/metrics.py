"""Prometheus metrics of one app, in its own registry so several apps can live in one process."""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from splitfuse.serving.bridge import EngineFront
from splitfuse.serving.protocol import PromptTokensDetails, Usage

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """splitfuse_* gauges read the engine's published stats at scrape time; the rest are event counts."""

    def __init__(self, engine: EngineFront) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("splitfuse_requests_running", "requests holding KV blocks", registry=r).set_function(
            lambda: engine.stats.running)
        Gauge("splitfuse_requests_waiting", "requests queued for admission", registry=r).set_function(
            lambda: engine.stats.waiting)
        Gauge("splitfuse_kv_blocks_used", "KV cache blocks in use", registry=r).set_function(
            lambda: engine.stats.kv_blocks_used)
        Gauge("splitfuse_kv_blocks_total", "KV cache blocks in all", registry=r).set_function(
            lambda: engine.stats.kv_blocks_total)
        r.register(_FaultCounters(engine))
        r.register(_EngineCounter("splitfuse_preemptions", "sequences preempted (KV full) and recomputed",
                                  lambda: engine.stats.preemptions))
        self.ttft = Histogram("splitfuse_time_to_first_token_seconds", "request arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("splitfuse_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("splitfuse_prompt_tokens", "prompt tokens admitted", registry=r)
        # cached / (cached + computed) is the prefix cache's hit rate
        self.prompt_tokens_cached = Counter("splitfuse_prompt_tokens_cached",
                                            "prompt tokens whose KV came from the prefix cache", registry=r)
        self.prompt_tokens_computed = Counter("splitfuse_prompt_tokens_computed",
                                              "prompt tokens run through the model", registry=r)
        self.generation_tokens = Counter("splitfuse_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("splitfuse_requests_finished", "requests by finish reason",
                                ["finish_reason"], registry=r)

    def tracker(self, prompt_lens: list[int], num_choices: int = 1) -> Tracker:
        return Tracker(self, prompt_lens, num_choices)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FaultCounters:
    """Replica restarts and resent requests: the engine front counts them, the scrape reads them."""

    def __init__(self, engine: EngineFront) -> None:
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("splitfuse_replica_restarts", "replicas launched again after dying",
                                  value=self.engine.restarts)
        yield CounterMetricFamily("splitfuse_requests_retried",
                                  "requests resent to another replica after theirs died", value=self.engine.retries)


class _EngineCounter:
    """A counter the engine keeps (its published stats), read at scrape time."""

    def __init__(self, name: str, documentation: str, read) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


class Tracker:
    """Latency and token bookkeeping of one HTTP request: its prompts, each with num_choices
    choices; choice index i belongs to prompt i // num_choices."""

    def __init__(self, metrics: Metrics, prompt_lens: list[int], num_choices: int = 1) -> None:
        self.metrics = metrics
        self.prompt_lens, self.num_choices = list(prompt_lens), num_choices
        self.start = time.perf_counter()
        total = len(self.prompt_lens) * num_choices
        self.last: list[float | None] = [None] * total
        self.cached: list[int] = [0] * total  # prompt tokens each choice found in the prefix cache
        self.generated: list[int] = [0] * total  # tokens each choice has received

    def token(self, index: int, out) -> None:
        """One RequestOutput of choice `index` arrived."""
        now = time.perf_counter()
        previous = self.last[index]
        if previous is None:
            self.metrics.ttft.observe(now - self.start)
            self.cached[index] = out.num_cached_tokens
            self.metrics.prompt_tokens_cached.inc(out.num_cached_tokens)
            self.metrics.prompt_tokens_computed.inc(self.prompt_lens[index // self.num_choices] - out.num_cached_tokens)
        else:
            self.metrics.itl.observe(now - previous)
        self.last[index] = now
        self.generated[index] += len(out.new_token_ids)
        self.metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finish_reason is not None:
            self.metrics.requests.labels(out.finish_reason).inc()

    @property
    def completion_tokens(self) -> int:
        return sum(self.generated)

    def replay(self, index: int) -> None:
        """Choice `index` starts over on another engine: its tokens so far do not count in usage."""
        self.generated[index] = 0

    def usage(self) -> Usage:
        """OpenAI's usage: each prompt counted once, its cached tokens as its first choice found them."""
        prompt = sum(self.prompt_lens)
        cached = sum(self.cached[p * self.num_choices] for p in range(len(self.prompt_lens)))
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                     total_tokens=prompt + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
