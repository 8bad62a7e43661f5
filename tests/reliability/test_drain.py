"""SIGTERM drains within the drain timeout: requests that can finish do, the rest are answered 503
(an error event then [DONE] in a stream), and the server returns. (`splitfuse serve` exiting 0 on
SIGTERM is tested in tests/serving/test_serve_cli.py.)"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import uvicorn
from fault_backends import SLOW, registered

from splitfuse.serving.drain import DrainingServer
from splitfuse.serving.server import build_app

DRAIN_TIMEOUT_S = 2.0


def _wait_running(url: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(url + "/health", timeout=5).json()["running"] < count:
        assert time.monotonic() < deadline, f"{count} requests did not start running"
        time.sleep(0.02)


def test_sigterm_finishes_what_fits_in_the_drain_timeout_and_503s_the_rest(tiny_model_dir):
    with registered():
        app, engine = build_app(tiny_model_dir("llama"), SLOW, num_kv_blocks=64)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = DrainingServer(uvicorn.Config(app, log_level="warning", lifespan="off"), engine, DRAIN_TIMEOUT_S)
    serving = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    serving.start()
    results: dict[str, object] = {}

    def post(name: str, max_tokens: int) -> None:
        results[name] = httpx.post(url + "/v1/completions", timeout=60,
                                   json={"prompt": name, "max_tokens": max_tokens, "ignore_eos": True})

    def stream() -> None:
        body = {"prompt": "streamed", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
            results["stream"] = [line for line in reply.iter_lines() if line]

    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    clients = [threading.Thread(target=post, args=("long", 400)), threading.Thread(target=stream)]
    for client in clients:
        client.start()
    _wait_running(url, 2)
    clients.append(threading.Thread(target=post, args=("short", 10)))  # 10 slow steps fit in the drain
    clients[-1].start()
    _wait_running(url, 3)
    start = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)  # what the signal calls (signals reach the main thread only)
    serving.join(30)
    for client in clients:
        client.join(30)
    assert not serving.is_alive()
    assert time.monotonic() - start < DRAIN_TIMEOUT_S + 6  # the drain, plus the grace for the replies
    assert results["short"].status_code == 200
    assert results["short"].json()["choices"][0]["finish_reason"] == "length"
    assert results["long"].status_code == 503
    assert set(results["long"].json()["error"]) == {"message", "type", "param", "code"}
    events = results["stream"]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and error["code"] == "unavailable"
