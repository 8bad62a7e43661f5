"""ASGI guard in front of the routes: Host allow-list, API key on /v1/*, request body size limit,
and clients too slow to send their body or to read their reply."""

from __future__ import annotations

import asyncio
import hmac
import json

from splitfuse.serving.protocol import error_body

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def default_allowed_hosts(bind_host: str) -> frozenset[str] | None:
    """Loopback names when bound to loopback (a DNS-rebinding page cannot reach the server through
    another name); None (any Host) otherwise."""
    return LOOPBACK_HOSTS if bind_host in LOOPBACK_HOSTS else None


def host_name(header: bytes) -> str:
    """The Host header without its port: "[::1]:8000" -> "::1"."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _reply(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    """Rejects before routing, so oversized, unauthenticated or misaddressed bodies are never parsed."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, allowed_hosts: frozenset[str] | None = None,
                 client_timeout_s: float = 30.0) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = allowed_hosts
        # The longest a client may pause while sending its body, or leave its reply unread.
        self.client_timeout_s = client_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.allowed_hosts is not None and host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            return await _reply(send, 400, error_body(
                f"the Host header {headers.get(b'host', b'').decode('latin-1')!r} is not allowed; this server "
                f"answers to {', '.join(sorted(self.allowed_hosts))} (--allowed-hosts)",
                "invalid_request_error", None, "host_not_allowed"))
        if self.api_key is not None and scope["path"].startswith("/v1"):
            # The scheme is case-insensitive (RFC 7235); compare_digest: the time taken must not
            # reveal how much of a guessed key was right.
            scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                return await _reply(send, 401, error_body(
                    "missing or invalid API key: send 'Authorization: Bearer KEY'",
                    "authentication_error", None, "invalid_api_key"))
        too_large = error_body(f"request body is larger than {self.max_body_bytes} bytes",
                               "invalid_request_error", None, "request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _reply(send, 413, too_large)
        send = self._bounded_send(send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the body here (chunked uploads declare no length), then replay it to the app.
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.client_timeout_s)
            except asyncio.TimeoutError:
                return await _reply(send, 408, error_body(
                    f"the request body did not arrive within {self.client_timeout_s} s",
                    "invalid_request_error", None, "request_timeout"))
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _reply(send, 413, too_large)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _bounded_send(self, send):
        """send that fails once a client leaves its reply unread for client_timeout_s: the write
        buffer stays bounded, and a stream's requests are aborted as if the client had left."""
        async def bounded(message) -> None:
            try:
                await asyncio.wait_for(send(message), self.client_timeout_s)
            except asyncio.TimeoutError:
                raise ConnectionError(f"the client read nothing for {self.client_timeout_s} s") from None

        return bounded
