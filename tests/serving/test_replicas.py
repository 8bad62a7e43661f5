"""Two engine processes behind one server: same outputs, spread by outstanding tokens, survive a death.

The tests share one two-replica server; the tests that pause or kill one run last in the file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

import splitfuse
from replica_faults import PROMPTS, check_kill_mid_load, health
from splitfuse.serving.bridge import EngineStopped
from splitfuse.serving.replicas import ReplicaLoad, pick_replica


# ---- the router alone ---------------------------------------------------------------------------
def test_router_picks_the_fewest_outstanding_tokens():
    loads = [ReplicaLoad(0, True, 500, 1), ReplicaLoad(1, True, 120, 9), ReplicaLoad(2, True, 300, 0)]
    assert pick_replica(loads) == 1  # tokens, not request counts, decide
    loads[1].alive = False
    assert pick_replica(loads) == 2  # the dead one is out of rotation
    # Equal load: the replica given fewer requests so far, so an idle pool still spreads.
    assert pick_replica([ReplicaLoad(0, True, 0, 3), ReplicaLoad(1, True, 0, 2)]) == 1
    with pytest.raises(EngineStopped):
        pick_replica([ReplicaLoad(0, False, 0), ReplicaLoad(1, False, 0)])


# ---- a real two-replica server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir):
    handle = splitfuse.serve(tiny_model_dir("llama"), backend="cpu", kv_block_size=16, num_kv_blocks=64,
                             served_model_name="llama", replicas=2)
    yield handle
    handle.terminate(timeout=15)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completions_equal_the_single_engine(server, client, tiny_model_dir):
    pipe = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", num_kv_blocks=64, kv_block_size=16)
    want = [r.text for r in pipe(PROMPTS, max_new_tokens=8, temperature=0)]

    async def ask_all():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return await asyncio.gather(*(aclient.completions.create(model="llama", prompt=p, max_tokens=8,
                                                                 temperature=0) for p in PROMPTS))

    got = asyncio.run(ask_all())
    assert [c.choices[0].text for c in got] == want
    # Concurrent requests reserve load as they are routed, so both replicas got some.
    replicas = health(server)["replicas"]
    assert all(r["requests"] >= 1 and r["state"] == "ok" for r in replicas), replicas


def test_sequential_requests_spread_when_idle(server, client):
    before = [r["requests"] for r in health(server)["replicas"]]
    for _ in range(4):
        client.completions.create(model="llama", prompt="hi", max_tokens=2, temperature=0)
    after = [r["requests"] for r in health(server)["replicas"]]
    # Idle replicas tie on load; the tie goes to the one given fewer requests, so both get some.
    assert min(b - a for a, b in zip(before, after)) >= 1, (before, after)


def test_streaming_and_n_through_replicas(client):
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="llama", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True))
    plain = client.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert text == plain.choices[0].text
    many = client.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=4, temperature=0, n=3)
    assert len({c.text for c in many.choices}) == 1 and len(many.choices) == 3


def test_the_pool_reports_what_its_replicas_were_built_with(server):
    settings = server.engine.settings
    assert (settings.block_size, settings.num_kv_blocks, settings.dtype) == (16, 64, "float32")
    assert settings.max_model_len == server.engine.max_model_len and "cpu" in settings.backend


def test_one_queue_limit_covers_all_replicas(server):
    """max_waiting counts what no replica could admit now, on every replica together: with both
    replicas paused and one slot each, 5 requests against a limit of 1 get 3 admitted (spread over
    both) and 2 answered 429."""
    pool = server.engine
    before = [r.assigned for r in pool.replicas]
    limits = pool.max_waiting, pool.max_seqs
    pool.max_waiting, pool.max_seqs = 1, 1
    for replica in pool.replicas:
        os.kill(replica.engine.pid, signal.SIGSTOP)
    try:
        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                tasks = [asyncio.create_task(http.post("/v1/completions", json={
                    "model": "llama", "prompt": p, "max_tokens": 3, "temperature": 0})) for p in PROMPTS + ["b"]]
                deadline = time.monotonic() + 20
                while sum(t.done() for t in tasks) < 2:  # the refused ones answer at once
                    assert time.monotonic() < deadline, "no request was refused"
                    await asyncio.sleep(0.01)
                spread = [r.assigned - b for r, b in zip(pool.replicas, before)]
                for replica in pool.replicas:
                    os.kill(replica.engine.pid, signal.SIGCONT)
                return spread, await asyncio.gather(*tasks)

        spread, replies = asyncio.run(run())
    finally:
        pool.max_waiting, pool.max_seqs = limits
        for replica in pool.replicas:
            os.kill(replica.engine.pid, signal.SIGCONT)
    assert sorted(r.status_code for r in replies) == [200, 200, 200, 429, 429]
    assert all(r.json()["error"]["code"] == "queue_full" for r in replies if r.status_code == 429)
    assert all(r.headers["retry-after"] == "1" for r in replies if r.status_code == 429)
    assert sorted(spread) == [1, 2]  # a per-replica limit of 1 would have admitted four


def test_more_completions_than_a_replica_could_ever_queue_is_400_naming_n(server):
    pool = server.engine
    limits = pool.max_waiting, pool.max_seqs
    pool.max_waiting, pool.max_seqs = 4, 8
    try:
        reply = httpx.post(server.url + "/v1/completions", timeout=30,
                           json={"model": "llama", "prompt": [f"p{i}" for i in range(10)], "n": 2, "max_tokens": 2})
    finally:
        pool.max_waiting, pool.max_seqs = limits
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "n"
    assert "20 completions" in error["message"] and "at most 12" in error["message"]


def test_a_dead_replica_loses_no_request_that_had_sent_nothing(server):
    """Its unstarted and non-streaming requests are resent and succeed, its stream ends with an
    error event, it is launched again and serves, no KV block stays held (see replica_faults.py)."""
    check_kill_mid_load(server)


def test_replicas_spread_over_the_backends_devices():
    from splitfuse.serving.replicas import replica_devices

    assert replica_devices(4, 2) == [0, 1]
    assert replica_devices(2, 5) == [0, 1, 0, 1, 0]
    assert replica_devices(1, 3) == [0, 0, 0]  # one device (the cpu): all share it
    assert replica_devices(0, 2) == [0, 0]  # a backend reporting none still gets index 0


@pytest.mark.parametrize("device_type, devices, want_threads, want_devices", [
    ("cpu", 1, 4, [0, 0]),  # replicas on the CPU share its 8 cores
    ("cuda", 2, None, [0, 1]),  # replicas on devices leave threads to torch, one device each
])
def test_replica_placement_asks_the_backend_where_it_runs(monkeypatch, device_type, devices, want_threads,
                                                          want_devices):
    from splitfuse.backends.base import Backend
    from splitfuse.serving import replicas

    class Fake(Backend):
        name = "fake"

        @classmethod
        def device_type(cls) -> str:
            return device_type

        @classmethod
        def device_count(cls) -> int:
            return devices

    asked = []
    monkeypatch.setattr(replicas, "backend_class", lambda name: asked.append(name) or Fake)
    placement = replicas.place_replicas("auto", 2, cpu_count=8)
    assert (placement.threads, placement.devices) == (want_threads, want_devices)
    assert asked == ["auto"]  # auto is resolved by backend selection, not by asking torch


def test_the_cpu_backend_splits_the_cores_between_replicas():
    from splitfuse.serving.replicas import place_replicas

    assert place_replicas("cpu", 3, cpu_count=7).threads == 2
    assert place_replicas("cpu", 16, cpu_count=4).threads == 1
