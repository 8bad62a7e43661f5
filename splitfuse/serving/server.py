"""Start the server: `splitfuse serve` in the foreground, `splitfuse.serve()` in a background thread."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from splitfuse.config import EngineConfig
from splitfuse.serving.bridge import AsyncEngine, EngineFront
from splitfuse.serving.guard import default_allowed_hosts

log = logging.getLogger("splitfuse.serving")

_SERVER_OPTIONS = ("api_key", "chat_template", "max_waiting", "served_model_name", "max_body_bytes", "replicas",
                   "ray_address", "allowed_hosts", "client_timeout_s")

# uvicorn's limits on a client: idle keep-alive seconds, bytes of headers (h11's incomplete event),
# and h11 with a deadline for the request head.
_UVICORN_LIMITS = {"timeout_keep_alive": 5, "h11_max_incomplete_event_size": 16 * 1024,
                   "http": "splitfuse.serving.http_protocol:HeaderTimeoutH11Protocol"}


def _read_template(chat_template: str | None) -> str | None:
    """Template text as given, or read from a file when it names one."""
    if chat_template and "{" not in chat_template and os.path.isfile(chat_template):
        return Path(chat_template).read_text()
    return chat_template


def build_app(model: str | os.PathLike | None = None, backend: str | None = "auto", *, api_key: str | None = None,
              chat_template: str | None = None, max_waiting: int = 1024, served_model_name: str | None = None,
              max_body_bytes: int = 4 * 1024 * 1024, replicas: int = 1, ray_address: str | None = None,
              allowed_hosts: frozenset[str] | None = None, client_timeout_s: float = 30.0, **engine_kwargs):
    """Load the model and return (FastAPI app, engine front); engine_kwargs are EngineConfig fields.

    replicas=1 steps the engine in a thread of this process (AsyncEngine); more start that many
    engine processes behind a ReplicaPool, with the same interface. With ray_address the replicas
    (even one) are Ray actors instead: "local" starts a Ray instance here, "auto" joins the cluster
    this machine belongs to, anything else is a Ray address."""
    from splitfuse.assembly import build_engine
    from splitfuse.serving.app import create_app

    config = EngineConfig(**engine_kwargs)
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if ray_address is not None:
        from splitfuse.serving.ray_replicas import ray_engines
        from splitfuse.serving.replicas import ReplicaPool

        async_engine = ReplicaPool(model, backend, config, replicas, max_waiting=max_waiting,
                                   engines=ray_engines(model, backend, config, replicas, ray_address))
    elif replicas > 1:
        from splitfuse.serving.replicas import ReplicaPool

        async_engine = ReplicaPool(model, backend, config, replicas, max_waiting=max_waiting)
    else:
        async_engine = AsyncEngine(build_engine(model, backend, config), max_waiting=max_waiting)
    if served_model_name is None:
        if model is None:
            from splitfuse.data import default_model_dir

            model = default_model_dir()
        served_model_name = Path(model).resolve().name
    app = create_app(async_engine, served_model_name, async_engine.tokenizer, api_key=api_key,
                     chat_template=_read_template(chat_template), max_body_bytes=max_body_bytes,
                     allowed_hosts=allowed_hosts, client_timeout_s=client_timeout_s)
    return app, async_engine


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (listening starts when uvicorn serves it); a port in use is an
    error that says so in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server there? "
                      "pick another --port)") from None
    return sock


@dataclass
class ServerHandle:
    """A server running in this process; `terminate()` drains it and stops it."""

    url: str
    engine: EngineFront
    app: object
    _server: object
    _thread: threading.Thread

    def terminate(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let running ones finish within timeout (the rest get 503), then stop
        uvicorn and the engine thread."""
        from splitfuse.serving.drain import drain

        drain(self.engine, timeout)
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()


def _bind_then_build(model, host: str, port: int, backend: str | None, kwargs: dict):
    """(socket, app, engine front): the port is bound first, so a busy port fails before the model
    loads and port 0 resolves to a real port; the Host allow-list defaults to the bind address's."""
    kwargs.setdefault("allowed_hosts", default_allowed_hosts(host))
    sock = bind_socket(host, port)
    try:
        app, engine = build_app(model, backend, **kwargs)
    except BaseException:
        sock.close()
        raise
    return sock, app, engine


def serve(model: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 0,
          backend: str | None = "auto", ready_timeout: float = 60.0, **kwargs) -> ServerHandle:
    """Serve `model` from a background thread; port 0 picks a free port; returns once /health answers."""
    import uvicorn

    sock, app, engine = _bind_then_build(model, host, port, backend, kwargs)
    bound_port = sock.getsockname()[1]
    family = sock.family
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=30, **_UVICORN_LIMITS))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="splitfuse-http", daemon=True)
    thread.start()
    url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{bound_port}"
    handle = ServerHandle(url, engine, app, server, thread)
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200 and json.load(reply).get("status") == "ok":
                    return handle
        except OSError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            handle.terminate(timeout=5)
            raise RuntimeError(f"the server at {url} did not become healthy within {ready_timeout} s")
        time.sleep(0.05)


def browser_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens: a wildcard bind address becomes loopback."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def run(model: str | None, host: str = "127.0.0.1", port: int = 8000, backend: str | None = "auto",
        drain_timeout: float = 30.0, **kwargs) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; then running requests have drain_timeout
    seconds to finish, the rest are answered 503, and run() returns."""
    import uvicorn

    from splitfuse.serving.drain import DrainingServer

    class AnnouncingServer(DrainingServer):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # said once it listens, never before a failure
                log.warning("serving %s on %s; playground: %s/", app.state.handlers.model_name, url, url)

    sock, app, engine = _bind_then_build(model, host, port, backend, kwargs)
    url = browser_url(host, sock.getsockname()[1])
    server = AnnouncingServer(uvicorn.Config(app, log_level="info", lifespan="off", **_UVICORN_LIMITS),
                              engine, drain_timeout)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close(drain=True)
