"""Replicas as Ray actors behind one server: same answers as one engine, and a killed actor loses
no request that had not started. One local Ray instance (2 CPUs) serves every test here."""

from __future__ import annotations

import asyncio

import openai
import pytest

import splitfuse
from replica_faults import PROMPTS, check_kill_mid_load

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = splitfuse.serve(tiny_model_dir("llama"), backend="cpu", kv_block_size=16, num_kv_blocks=64,
                                 served_model_name="llama", replicas=2, ray_address="local")
        yield handle
        handle.terminate(timeout=15)
    finally:
        ray.shutdown()


def test_two_ray_replicas_answer_50_mixed_requests_as_one_engine(server, tiny_model_dir):
    pipe = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", num_kv_blocks=64, kv_block_size=16)
    want = {p: r.text for p, r in zip(PROMPTS, pipe(PROMPTS, max_new_tokens=8, temperature=0))}

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            chunks = await client.completions.create(model="llama", prompt=prompt, max_tokens=8, temperature=0,
                                                     stream=True)
            return prompt, "".join([c.choices[0].text async for c in chunks if c.choices])
        reply = await client.completions.create(model="llama", prompt=prompt, max_tokens=8, temperature=0)
        return prompt, reply.choices[0].text

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return await asyncio.gather(*(one(client, i) for i in range(50)))

    got = asyncio.run(run())
    assert [text for _, text in got] == [want[prompt] for prompt, _ in got]
    replicas = server.engine.stats.replicas
    assert all(r["requests"] >= 1 and r["state"] == "ok" for r in replicas), replicas
    assert len({r["pid"] for r in replicas}) == 2


def test_a_killed_ray_actor_loses_no_request_that_had_sent_nothing(server):
    check_kill_mid_load(server)
