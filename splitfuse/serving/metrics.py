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

from splitfuse.serving.bridge import EngineFront

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
        self.ttft = Histogram("splitfuse_time_to_first_token_seconds", "request arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("splitfuse_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("splitfuse_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("splitfuse_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("splitfuse_requests_finished", "requests by finish reason",
                                ["finish_reason"], registry=r)

    def tracker(self, num_choices: int) -> Tracker:
        return Tracker(self, num_choices)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Tracker:
    """Latency bookkeeping of one HTTP request's choices."""

    def __init__(self, metrics: Metrics, num_choices: int) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: list[float | None] = [None] * num_choices

    def token(self, index: int, num_tokens: int, finish_reason: str | None) -> None:
        now = time.perf_counter()
        previous = self.last[index]
        if previous is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - previous)
        self.last[index] = now
        self.metrics.generation_tokens.inc(num_tokens)
        if finish_reason is not None:
            self.metrics.requests.labels(finish_reason).inc()
