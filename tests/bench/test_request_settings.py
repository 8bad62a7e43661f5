"""What the bench sends is what the flags say (else the server's defaults), and a server that
rejects requests fails the run loudly instead of reporting a throughput of 0."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from tqdm import tqdm

from splitfuse.bench import runner
from splitfuse.bench.clients import FIXED_LENGTH_GREEDY, OpenAIClient, RequestSettings
from splitfuse.bench.workloads import BenchRequest
from splitfuse.cli import main

WORKLOAD = [BenchRequest([5, 6, 7], 4), BenchRequest([8, 9], 3)]


def client_for(handler, settings: RequestSettings) -> OpenAIClient:
    return OpenAIClient("http://x/v1", "m", "mock", send_ids=True, transport=httpx.MockTransport(handler),
                        settings=settings)


def sent_body(settings: RequestSettings) -> dict:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(200, content=b'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: [DONE]\n\n')

    async def go():
        client = client_for(handler, settings)
        await client.start()
        try:
            return await client.send(WORKLOAD[0])
        finally:
            await client.close()

    assert asyncio.run(go()).ok
    return seen


def test_no_settings_send_nothing_but_the_request():
    body = sent_body(RequestSettings())
    assert set(body) == {"model", "prompt", "max_tokens", "stream", "stream_options"}
    assert body["max_tokens"] == 4


def test_each_setting_is_sent_and_extra_body_wins():
    body = sent_body(RequestSettings(temperature=0.7, top_p=0.9, ignore_eos=True, min_tokens=True,
                                     extra_body={"top_k": 5, "temperature": 0.5}))
    assert {k: body[k] for k in ("temperature", "top_p", "ignore_eos", "min_tokens", "top_k")} == {
        "temperature": 0.5, "top_p": 0.9, "ignore_eos": True, "min_tokens": 4, "top_k": 5}


def test_fixed_length_greedy_is_fastgens_setting():
    assert FIXED_LENGTH_GREEDY.fields(7) == {"temperature": 0.0, "ignore_eos": True, "min_tokens": 7}


def test_flags_become_settings_and_none_given_leaves_each_systems_default(monkeypatch, tmp_path):
    captured = {}
    monkeypatch.setattr(runner, "run", lambda options: captured.setdefault("options", options) and {"systems": {}})
    base = ["bench", "--out", str(tmp_path), "--endpoint", "http://x/v1", "--no-progress"]
    assert main(base) == 0
    assert captured.pop("options").request_settings is None
    assert main(base + ["--temperature", "0.3", "--top-p", "0.8", "--ignore-eos", "--extra-body", '{"top_k": 2}']) == 0
    assert captured["options"].request_settings == RequestSettings(temperature=0.3, top_p=0.8, ignore_eos=True,
                                                                   extra_body={"top_k": 2})


def test_extra_body_must_be_a_json_object(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--out", str(tmp_path), "--extra-body", "[1, 2]"])
    assert exit_.value.code != 0
    assert "--extra-body" in capsys.readouterr().err


def run_system(handler) -> dict:
    options = runner.BenchOptions(out="unused", clients=[2], rates=[])
    client = client_for(handler, RequestSettings(ignore_eos=True))
    with tqdm(disable=True) as bar:
        return asyncio.run(runner._run_system(client, options, WORKLOAD, [], bar))


def test_a_rejected_request_fails_the_system_with_the_servers_message():
    def reject(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": "Unexpected fields in the request: {'ignore_eos'}"})

    with pytest.raises(runner.RequestRejected, match=r"rejected 2 of 2 requests.*HTTP 422.*ignore_eos"):
        run_system(reject)


def test_a_point_where_nothing_completed_fails_instead_of_reporting_zero():
    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "out of memory"}})

    with pytest.raises(RuntimeError, match="no request completed.*HTTP 500.*out of memory"):
        run_system(broken)


def test_overload_429_is_measured_not_fatal():
    calls = []

    def busy_once(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(429, json={"error": {"message": "queue full"}})
        return httpx.Response(200, content=b'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: [DONE]\n\n')

    point = run_system(busy_once)["points"][0]
    assert (point["completed"], point["failed"]) == (1, 1)
