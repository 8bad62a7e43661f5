"""A replica killed mid-load, told the same way for local processes and Ray actors.

Replica X streams S and generates N (not streamed); X is paused (SIGSTOP) while more requests
arrive, some routed to it; then it is killed. N and its unstarted requests must be resent and
succeed, S must end with an error event then [DONE], X must be launched again and serve, and no KV
block may stay held anywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import openai

PROMPTS = ["The quick brown fox", "Hello there", "One two three four five six", "a"]


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=5).json()


def wait_health(server, predicate, timeout: float = 20.0) -> dict:
    """/health's body once predicate(body) holds; fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        body = health(server)
        if predicate(body):
            return body
        assert time.monotonic() < deadline, f"condition not reached: {body}"
        time.sleep(0.02)


async def until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def check_kill_mid_load(server, num_requests: int = 8, restart_timeout: float = 90.0) -> None:
    pool = server.engine
    long = {"model": "llama", "temperature": 0, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async with http.stream("POST", "/v1/completions",
                                   json={**long, "prompt": PROMPTS[0], "max_tokens": 200, "stream": True}) as stream:
                lines = stream.aiter_lines()
                first = [await anext(lines)]
                holder = next(r for r in pool.replicas if r.routes)
                # The other replica gets a long request, so a non-streaming one N then joins S here.
                ballast = asyncio.create_task(http.post("/v1/completions", json={
                    **long, "prompt": PROMPTS[1], "max_tokens": 300}))
                await until(lambda: sum(len(r.routes) for r in pool.replicas) == 2)
                n = asyncio.create_task(http.post("/v1/completions", json={
                    **long, "prompt": PROMPTS[2], "max_tokens": 100}))
                await until(lambda: sum(route.started for route in holder.routes.values()) == 2)
                os.kill(holder.engine.pid, signal.SIGSTOP)  # frozen: nothing it holds can start any more
                before = sum(r.assigned for r in pool.replicas)
                tasks = [asyncio.create_task(http.post("/v1/completions", json={
                    **long, "prompt": f"{PROMPTS[i % 4]} {i}", "max_tokens": 100})) for i in range(num_requests)]
                await until(lambda: sum(r.assigned for r in pool.replicas) - before == num_requests)
                with pool.lock:
                    unstarted = sum(not route.started for route in holder.routes.values())
                    resendable = sum(not route.started or route.queue.replayable for route in holder.routes.values())
                retries, pid = pool.retries, holder.engine.pid
                os.kill(pid, signal.SIGKILL)
                # While it restarts, /health shows it out of rotation with zeroed figures, not its last ones.
                body = wait_health(server, lambda b: b["replicas"][holder.index]["state"] != "ok")
                rest = [line async for line in lines]
            replies = await asyncio.gather(n, ballast, *tasks)
            return holder, pid, unstarted, resendable - unstarted, retries, body, first + rest, replies

    holder, pid, unstarted, replayed, retries, body, stream_lines, replies = asyncio.run(run())
    assert unstarted >= 1, "no request was routed to the paused replica"
    assert replayed == 1  # N had started, but its client had received nothing
    assert [r.status_code for r in replies] == [200] * (num_requests + 2), [r.text for r in replies]
    assert all(len(r.json()["choices"][0]["text"]) > 0 for r in replies)
    n_usage = replies[0].json()["usage"]
    assert n_usage["completion_tokens"] == 100  # what N generated before the death is not counted twice
    assert pool.retries - retries == unstarted + replayed

    events = [line for line in stream_lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == "unavailable" and "died" in error["message"], error
    dead = body["replicas"][holder.index]
    assert dead["state"] == "restarting" and dead["kv_blocks_total"] == 0 and dead["running"] == 0

    back = wait_health(server, lambda b: b["replicas"][holder.index]["state"] == "ok", timeout=restart_timeout)
    assert back["replicas"][holder.index]["pid"] not in (pid, None)
    assert back["replicas"][holder.index]["restarts"] == 1
    metrics = httpx.get(server.url + "/metrics").text
    assert "splitfuse_replica_restarts_total 1.0" in metrics
    assert f"splitfuse_requests_retried_total {float(pool.retries)}" in metrics

    # Back in rotation: concurrent requests reach both replicas and succeed.
    served = holder.assigned

    async def two():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return await asyncio.gather(*(client.completions.create(model="llama", prompt=p, max_tokens=30,
                                                                temperature=0, extra_body={"ignore_eos": True})
                                      for p in PROMPTS[:2]))

    assert all(c.choices[0].text for c in asyncio.run(two()))
    assert holder.assigned > served
    idle = wait_health(server, lambda b: all(r["running"] == 0 and r["waiting"] == 0 and r["kv_blocks_used"] == 0
                                             for r in b["replicas"]))
    for replica in idle["replicas"]:
        assert replica["kv_blocks_free"] == replica["kv_blocks_total"] > 0
        assert replica["outstanding_tokens"] == 0 and replica["in_flight"] == 0
