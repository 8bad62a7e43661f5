"""Latency and throughput metrics of one load point, from per-request token timelines.

Pure functions over `RequestRecord`s; every time is in seconds on one monotonic clock.

Definitions (FastGen's and vLLM's):
- ttft: first token time - send time; e2e: last token time - send time.
- itl: gaps between consecutive output tokens of a request (all requests pooled).
- tpot: per request, (e2e - ttft) / (output tokens - 1), requests with at least 2 tokens.
- percentiles: numpy's default linear interpolation.
- FastGen SLA at R tokens/s: ttft <= prompt_tokens / 512 and the exponential moving average
  (span 16, pandas' `ewm(span=16).mean()` with adjust=True) of the request's itl series stays
  strictly below 1 / R at every token. A request with one output token has no itl and meets the
  token part. Effective throughput = requests meeting the SLA / duration (a failed request
  never meets it); sla_fraction = requests meeting it / all requests sent.
- Cumulative variant: the same ttft test, and every token i (0-based, i >= 1) arrives at most
  i / R seconds after the first token.
- Goodput (vLLM): completed requests meeting every given limit (ttft, tpot, e2e; each <=) per second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)
SLA_RATES = (2.0, 4.0, 6.0)
PROMPT_TOKENS_PER_S = 512.0
EMA_SPAN = 16


@dataclass
class RequestRecord:
    """What a client saw of one request: send time, each output token's arrival, token counts."""

    prompt_tokens: int
    start: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None
    tokens_from_usage: int = 0  # tokens the stream did not carry one by one, counted from its usage
    status: int | None = None  # the HTTP status of a request the server answered with an error

    @property
    def rejected(self) -> bool:
        """The server refused the request itself (4xx other than 429, which is load): a setting it
        does not take, not a measurement."""
        return self.status is not None and 400 <= self.status < 500 and self.status != 429

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.start

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None


def summarize(values: list[float]) -> dict[str, float | None]:
    """mean and p50/p90/p95/p99 (numpy linear interpolation); None each when there are no values."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    out = {"mean": float(arr.mean())}
    for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES, method="linear")):
        out[f"p{p}"] = float(v)
    return out


def ema(values: list[float], span: int = EMA_SPAN) -> list[float]:
    """Exponential moving average as pandas' `Series.ewm(span=span).mean()` (adjust=True)."""
    alpha = 2.0 / (span + 1.0)
    decay = 1.0 - alpha
    out, num, den = [], 0.0, 0.0
    for x in values:
        num = num * decay + x
        den = den * decay + 1.0
        out.append(num / den)
    return out


def meets_ttft_sla(record: RequestRecord, prompt_tokens_per_s: float = PROMPT_TOKENS_PER_S) -> bool:
    """First token within prompt_tokens / 512 seconds (boundary included)."""
    return record.ttft <= record.prompt_tokens / prompt_tokens_per_s


def meets_sla(record: RequestRecord, rate: float, span: int = EMA_SPAN) -> bool:
    """FastGen's SLA: ttft test, and the EMA of the itl stays strictly below 1 / rate."""
    if not record.ok or not meets_ttft_sla(record):
        return False
    limit = 1.0 / rate
    return all(v < limit for v in ema(record.itl, span))


def meets_cumulative_sla(record: RequestRecord, rate: float) -> bool:
    """Stricter variant: ttft test, and token i arrives at most i / rate s after the first token."""
    if not record.ok or not meets_ttft_sla(record):
        return False
    first = record.token_times[0]
    return all(t - first <= i / rate for i, t in enumerate(record.token_times[1:], start=1))


def meets_goodput(record: RequestRecord, slo: dict[str, float]) -> bool:
    """vLLM's goodput test: every limit given in seconds (keys ttft, tpot, e2e) is met (<=)."""
    if not record.ok:
        return False
    for name, limit in slo.items():
        value = record.tpot if name == "tpot" else getattr(record, name)
        if value is not None and value > limit:
            return False
    return True


def point_metrics(records: list[RequestRecord], duration: float, rates: tuple[float, ...] = SLA_RATES,
                  goodput_slo: dict[str, float] | None = None) -> dict:
    """All metrics of one load point; duration is first send to last token, in seconds."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    done = [r for r in records if r.ok]
    req_tput = len(done) / duration
    out_tokens = sum(r.output_tokens for r in done)
    result = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration,
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "output_tokens": out_tokens,
        "tokens_from_usage": sum(r.tokens_from_usage for r in done),
        "request_throughput": req_tput,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in done)) / duration,
        "ttft": summarize([r.ttft for r in done]),
        "tpot": summarize([r.tpot for r in done if r.tpot is not None]),
        "itl": summarize([gap for r in done for gap in r.itl]),
        "e2e": summarize([r.e2e for r in done]),
    }
    n = len(records)
    for key, test in (("effective_throughput", meets_sla), ("effective_throughput_cumulative", meets_cumulative_sla)):
        met = {_rate_key(rate): sum(test(r, rate) for r in records) for rate in rates}
        result[key] = {k: m / duration for k, m in met.items()}
        result[key.replace("effective_throughput", "sla_fraction")] = {k: m / n if n else 0.0 for k, m in met.items()}
    if goodput_slo:
        result["goodput"] = sum(meets_goodput(r, goodput_slo) for r in records) / duration
        result["goodput_slo"] = dict(goodput_slo)
    return result


def _rate_key(rate: float) -> str:
    """'4' for 4.0, '2.5' for 2.5: the SLA rate as a JSON key."""
    return f"{rate:g}"


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` (milliseconds, vLLM's syntax) -> {"ttft": 0.5, "tpot": 0.05} in seconds."""
    slo = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = {"e2el": "e2e"}.get(name.strip(), name.strip())
        if not sep or name not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"--goodput: expected NAME:MS with NAME one of ttft, tpot, e2e, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {name} needs a number of milliseconds, got {value!r}") from None
        if ms <= 0:
            raise ValueError(f"--goodput: {name} must be positive, got {ms}")
        slo[name] = ms / 1000.0
    return slo
