"""--max-waiting counts only what the scheduler cannot admit; a request that can never be queued is a 400."""

from __future__ import annotations

import asyncio

import httpx

from splitfuse.testing.server import wait_idle


def test_a_burst_into_free_capacity_is_all_admitted(start_server):
    server = start_server(max_waiting=4)

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={
                "prompt": f"Request number {i}", "max_tokens": 3}) for i in range(40)))

    assert [r.status_code for r in asyncio.run(burst())] == [200] * 40
    assert wait_idle(server.url)["kv_blocks_used"] == 0


def test_a_request_larger_than_the_queue_can_ever_hold_is_400(start_server):
    server = start_server(max_waiting=4, max_seqs=8)
    reply = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"prompt": [f"p{i}" for i in range(100)], "n": 16, "max_tokens": 2})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "n"
    assert "1600 completions" in error["message"] and "at most 12" in error["message"]


def test_a_real_backlog_is_429_with_retry_after(start_server):
    server = start_server(max_waiting=0, max_seqs=1)  # one runs, none may wait

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={
                "prompt": f"Slot {i}", "max_tokens": 400, "ignore_eos": True}) for i in range(6)))

    replies = asyncio.run(burst())
    refused = [r for r in replies if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in replies)
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert refused[0].json()["error"]["type"] == "rate_limit_error"
    assert refused[0].json()["error"]["code"] == "queue_full"
    wait_idle(server.url)
