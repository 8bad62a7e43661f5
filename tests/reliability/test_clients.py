"""Clients the server must not trust: a wrong Host (DNS rebinding), a body that never arrives, a
reply that is never read, a 500 on a kept-alive connection."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from splitfuse.serving.guard import Guard
from splitfuse.serving.http_protocol import HeaderTimeoutH11Protocol
from splitfuse.testing.server import wait_idle

CLIENT_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(client_timeout_s=CLIENT_TIMEOUT_S)


def _raw(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


@pytest.mark.parametrize("host,status", [
    ("127.0.0.1", 200), ("localhost", 200), ("LOCALHOST:8000", 200), ("[::1]:80", 200),
    ("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1.evil.example", 400), ("", 400),
])
def test_only_loopback_names_reach_a_loopback_server(server, host, status):
    reply = httpx.get(server.url + "/v1/models", headers={"Host": host})
    assert reply.status_code == status
    if status == 400:
        assert reply.json()["error"]["code"] == "host_not_allowed"


def test_a_body_that_stops_arriving_is_408(server):
    with _raw(server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        start = time.monotonic()
        reply = b""
        while b"}}" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply
    assert time.monotonic() - start < CLIENT_TIMEOUT_S + 5


def test_headers_that_never_finish_arriving_close_the_connection(server, monkeypatch):
    monkeypatch.setattr(HeaderTimeoutH11Protocol, "header_timeout_s", CLIENT_TIMEOUT_S)
    with _raw(server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")  # and no more
        start = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the server
    assert time.monotonic() - start < CLIENT_TIMEOUT_S + 5


def test_a_reply_nobody_reads_fails_its_send_after_the_client_timeout():
    """A client that stops reading stalls the server's send once the socket buffers are full; the
    guard's send then fails, and a stream is aborted as if its client had left."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})

    async def never_drains(message):
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()

    guard = Guard(app, api_key=None, max_body_bytes=10, client_timeout_s=CLIENT_TIMEOUT_S)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="read nothing for 0.5 s"):
        asyncio.run(guard({"type": "http", "method": "GET", "path": "/", "headers": []}, None, never_drains))
    assert time.monotonic() - start < CLIENT_TIMEOUT_S + 2


def test_a_500_leaves_the_kept_alive_connection_usable(server, monkeypatch):
    def broken(model):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(server.app.state.handlers, "check_model", broken)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        failed = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        monkeypatch.undo()
        again = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert again.status_code == 200
        assert http.get("/health").status_code == 200


def test_405_names_the_allowed_methods(server):
    reply = httpx.get(server.url + "/v1/completions")
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"


def test_the_bearer_scheme_is_case_insensitive(start_server):
    server = start_server(api_key="k")
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"{scheme} k"}).status_code == 200
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic k"}).status_code == 401
