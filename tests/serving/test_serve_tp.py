"""Serving with tensor parallelism: `splitfuse serve -tp 2` answers the openai client as one rank
does; with replicas, each takes its own devices, and a dead worker rank costs only its replica."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

import splitfuse
from splitfuse.config import EngineConfig
from splitfuse.testing.processes import is_gone, spawned_children
from test_replicas import PROMPTS
from test_serve_cli import _free_port


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


async def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {what}"
        await asyncio.sleep(0.01)


def _want(path: str, max_tokens: int) -> list[str]:
    pipe = splitfuse.pipeline(path, backend="cpu", num_kv_blocks=64, kv_block_size=16)
    return [r.text for r in pipe(PROMPTS, max_new_tokens=max_tokens, temperature=0)]


def test_serve_with_two_ranks_answers_the_openai_client_and_leaves_no_process(tiny_model_dir):
    path, port = tiny_model_dir("llama"), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitfuse", "serve", path, "--backend", "cpu", "--port", str(port),
         "--num-kv-blocks", "64", "--kv-block-size", "16", "--served-model-name", "tiny",
         "--tensor-parallel-size", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        _wait_until(healthy, 180, "the server did not become healthy")
        workers = spawned_children(proc.pid)
        assert len(workers) == 1  # rank 1; rank 0 is the server process itself
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        got = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
               for p in PROMPTS]
        assert got == _want(path, 8)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _wait_until(lambda: all(is_gone(pid) for pid in workers), 10, "a worker rank outlived the server")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_replicas_take_disjoint_devices_for_their_ranks(monkeypatch):
    from splitfuse.backends.base import Backend
    from splitfuse.parallel.group import WorkerSpec
    from splitfuse.serving import replicas

    assert replicas.replica_devices(4, 2, tensor_parallel_size=2) == [0, 2]
    assert replicas.replica_devices(8, 3, tensor_parallel_size=2) == [0, 2, 4]
    # on the CPU every rank of every replica shares the cores (and its one device)
    cpu = replicas.place_replicas("cpu", 2, cpu_count=8, tensor_parallel_size=2)
    assert (cpu.threads, cpu.devices) == (2, [0, 0])

    class Fake(Backend):
        name = "fake"

        @classmethod
        def device_type(cls) -> str:
            return "cuda"

        @classmethod
        def device_count(cls) -> int:
            return 4

    monkeypatch.setattr(replicas, "backend_class", lambda name: Fake)
    assert replicas.place_replicas("fake", 2, tensor_parallel_size=2).devices == [0, 2]
    # replica 1's ranks: its engine (rank 0) on device 2, its worker rank 1 on device 3
    spec = WorkerSpec("m", "fake", EngineConfig(tensor_parallel_size=2), "nccl", "tcp://x", 2, False, 2, 1)
    assert [spec.device_index(rank) for rank in (0, 1)] == [2, 3]


@pytest.fixture
def tp_replicas(tiny_model_dir):
    handle = splitfuse.serve(tiny_model_dir("llama"), backend="cpu", kv_block_size=16, num_kv_blocks=64,
                             served_model_name="llama", replicas=2, tensor_parallel_size=2)
    yield handle
    handle.terminate(timeout=15)


def test_a_dead_worker_rank_takes_down_its_replica_only_and_its_requests_are_resent(tp_replicas, tiny_model_dir):
    server, pool = tp_replicas, tp_replicas.engine
    workers = [spawned_children(r.engine.pid) for r in pool.replicas]
    assert [len(w) for w in workers] == [1, 1]
    long = {"model": "llama", "max_tokens": 40, "temperature": 0, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            tasks = [asyncio.create_task(http.post("/v1/completions", json={**long, "prompt": p})) for p in PROMPTS]
            # every request routed, and both replicas generating
            await _until(lambda: sum(len(r.routes) for r in pool.replicas) == len(PROMPTS)
                         and all(r.routes and r.stats.running for r in pool.replicas), 30, "both replicas busy")
            os.kill(workers[0][0], signal.SIGKILL)  # replica 0's rank 1, mid-generation
            # its engine fails its step within seconds, and the replica leaves rotation
            await _until(lambda: pool.replicas[0].state != "ok", 10, "replica 0 out after its worker rank died")
            return await asyncio.gather(*tasks)

    replies = asyncio.run(run())
    # non-streaming requests had sent nothing to their clients: they ran again and answer as one rank would
    assert [r.status_code for r in replies] == [200] * len(PROMPTS), [r.text for r in replies]
    assert [r.json()["choices"][0]["text"] for r in replies] == _want(tiny_model_dir("llama"), 40)
    # replica 0 comes back with fresh ranks; the dead rank's replica left no process behind
    _wait_until(lambda: [r["state"] for r in httpx.get(server.url + "/health", timeout=5).json()["replicas"]]
                == ["ok", "ok"], 120, "replica 0 relaunched")
    assert pool.replicas[0].restarts == 1 and pool.replicas[1].restarts == 0
    assert is_gone(workers[0][0])
