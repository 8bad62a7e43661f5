"""Load drivers and the streaming client, with fake systems and a fake server (no model)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

from splitfuse.bench.clients import OpenAIClient
from splitfuse.bench.load import closed_loop, open_loop
from splitfuse.bench.metrics import RequestRecord
from splitfuse.bench.workloads import BenchRequest


class FakeSystem:
    """Answers each request after `delay` s with one token; tracks how many were in flight at once."""

    name = "fake"

    def __init__(self, delay: float) -> None:
        self.delay, self.in_flight, self.most, self.sends = delay, 0, 0, []

    def set_concurrency(self, clients: int) -> None:
        pass

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(len(request.prompt_ids), time.perf_counter())
        self.sends.append(record.start)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(self.delay)
        self.in_flight -= 1
        record.token_times.append(time.perf_counter())
        return record


def reqs(n: int) -> list[BenchRequest]:
    return [BenchRequest([i + 1] * (i + 1), 1) for i in range(n)]


def test_closed_loop_keeps_exactly_n_requests_in_flight():
    system = FakeSystem(0.01)
    records, duration = asyncio.run(closed_loop(system, reqs(9), clients=3))
    assert system.most == 3
    assert [r.prompt_tokens for r in records] == list(range(1, 10))  # workload order
    assert 0.03 <= duration < 0.5  # three rounds of 10 ms
    with pytest.raises(ValueError, match="at least 1"):
        asyncio.run(closed_loop(system, reqs(1), clients=0))


def test_open_loop_sends_at_seeded_poisson_times():
    system = FakeSystem(0.0)
    asyncio.run(open_loop(system, reqs(40), rate=100.0, seed=3))
    gaps = np.diff(system.sends)
    expected = np.random.default_rng(3).exponential(1 / 100.0, size=40)[1:]  # mean gap 10 ms
    assert np.abs(np.cumsum(gaps) - np.cumsum(expected)).max() < 0.05  # loose: a busy shared CPU delays wake-ups


def sse(*events) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def run_client(body: bytes, status: int = 200) -> tuple[RequestRecord, dict]:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(status, content=body)

    async def go():
        client = OpenAIClient("http://x/v1", "m", "x", send_ids=True, transport=httpx.MockTransport(handler))
        await client.start()
        try:
            return await client.send(BenchRequest([5, 6, 7], 4))
        finally:
            await client.close()

    return asyncio.run(go()), seen


def test_client_counts_tokens_and_fills_in_held_back_ones_from_usage():
    record, body = run_client(sse(
        {"choices": [{"index": 0, "text": "a"}]},
        {"choices": [{"index": 0, "text": "", "finish_reason": None}]},  # no text: no token seen yet
        {"choices": [{"index": 0, "text": "bc", "logprobs": {"tokens": ["b", "c"]}}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
        "[DONE]"))
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == body["min_tokens"] == 4 and body["ignore_eos"]
    assert record.ok and record.output_tokens == 4 and record.tokens_from_usage == 1
    assert record.token_times[1] == record.token_times[2] == record.token_times[3]  # b, c and the held-back one


def test_client_records_errors_instead_of_raising():
    record, _ = run_client(b'{"error": {"message": "too long"}}', status=400)
    assert not record.ok and record.error.startswith("HTTP 400") and "too long" in record.error
    record, _ = run_client(sse({"error": {"message": "engine failed"}}))
    assert record.error == "engine failed"
    record, _ = run_client(sse("[DONE]"))
    assert record.error == "the stream ended without a token"
