"""ReplicaPool: N engine processes behind AsyncEngine's interface, routed by outstanding tokens.

The HTTP process keeps the tokenizer; each replica process owns one Engine (replica_worker.py).
Each request group goes to the live replica with the fewest outstanding tokens (prompt tokens not
yet computed + new tokens not yet generated), counted here as outputs arrive. Round robin (MII)
ignores that one long prompt can cost as much as many short ones.

A replica whose process exits is taken out of rotation: its in-flight requests fail with
ReplicaLost (HTTP 503), new requests go to the others, and the pool stays ready while one lives.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from splitfuse.backends.selection import backend_class
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core.request import RequestOutput
from splitfuse.serving.bridge import (
    EngineStopped,
    ReplicaLost,
    RequestGroup,
    SingleRequests,
    Stats,
    _settle,
)
from splitfuse.serving.replica_worker import replica_main

log = logging.getLogger("splitfuse.serving")


@dataclass
class ReplicaLoad:
    """What the router knows of one replica."""

    index: int
    alive: bool
    outstanding: int  # tokens still to compute: unprefilled prompt + ungenerated max_new_tokens
    assigned: int = 0  # request groups sent so far; breaks ties so an idle pool still spreads


def pick_replica(loads: Sequence[ReplicaLoad]) -> int:
    """Index of the live replica with the fewest outstanding tokens (ties: fewer assigned, lower index)."""
    live = [load for load in loads if load.alive]
    if not live:
        raise EngineStopped("no replica is alive")
    return min(live, key=lambda load: (load.outstanding, load.assigned, load.index)).index


@dataclass
class PoolStats(Stats):
    """Sums over live replicas, plus each replica's own state (shown by /health)."""

    replicas: list[dict] = field(default_factory=list)


@dataclass
class _Route:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    prompt_left: int  # cleared by the request's first output: its prompt is then computed
    new_left: int

    @property
    def outstanding(self) -> int:
        return self.prompt_left + self.new_left


class _Replica:
    """Front-end half of one replica: the pipe, a reader thread, and the requests it owns."""

    def __init__(self, pool: ReplicaPool, index: int, process, conn) -> None:
        self.pool, self.index, self.process, self.conn = pool, index, process, conn
        self.alive = True
        self.routes: dict[str, _Route] = {}
        self.pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future, list[str]]] = {}
        self.stats = Stats()
        self.assigned = 0
        self.finished = 0
        self._send_lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def outstanding(self) -> int:
        return sum(route.outstanding for route in self.routes.values())

    def send(self, message) -> bool:
        """False when the process is gone; the reader thread then fails its requests."""
        try:
            with self._send_lock:
                self.conn.send(message)
            return True
        except OSError:
            return False

    def start_reader(self) -> None:
        self.thread = threading.Thread(target=self._read, name=f"splitfuse-replica-{self.index}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break  # the process exited (or was killed): its end of the pipe closed
            kind = message[0]
            if kind == "outputs":
                self.stats = message[2]
                self._deliver(message[1])
            elif kind == "stats":
                self.stats = message[1]
            elif kind == "admitted":
                self._admitted(message[1], message[2])
        self._died()

    def _admitted(self, group_id: int, error: Exception | None) -> None:
        with self.pool.lock:
            loop, future, rids = self.pending.pop(group_id, (None, None, []))
            if error is not None:
                for rid in rids:
                    self.routes.pop(rid, None)
                    self.pool._owner.pop(rid, None)
        if future is not None:
            _call(loop, _settle, future, error)

    def _deliver(self, outputs: list[tuple[str, RequestOutput | Exception]]) -> None:
        for rid, payload in outputs:
            with self.pool.lock:
                route = self.routes.get(rid)
                if route is None:
                    continue  # aborted by its client while the step ran
                if isinstance(payload, BaseException) or payload.finished:
                    del self.routes[rid]
                    self.pool._owner.pop(rid, None)
                    self.finished += 1
                else:
                    route.prompt_left = 0
                    route.new_left = max(0, route.new_left - len(payload.new_token_ids))
            if not _call(route.loop, route.queue.put_nowait, (route.index, payload)):
                self.pool._abort(rid)  # the client's loop is closed; nobody is listening

    def _died(self) -> None:
        """Out of rotation; fail everything it held (ReplicaLost -> 503) so no client waits forever."""
        with self.pool.lock:
            self.alive = False
            routes, self.routes = self.routes, {}
            pending, self.pending = self.pending, {}
            for rid in routes:
                self.pool._owner.pop(rid, None)
        self.process.join(5)
        code = self.process.exitcode
        if not self.pool.closing:
            log.error("replica %d (pid %s) exited with code %s; %d requests failed", self.index,
                      self.process.pid, code, len(routes))
        lost = ReplicaLost(f"replica {self.index} exited (code {code}) while serving this request; retry")
        for loop, future, _ in pending.values():
            _call(loop, _settle, future, EngineStopped(str(lost)))
        for route in routes.values():
            _call(route.loop, route.queue.put_nowait, (route.index, lost))

    def describe(self) -> dict:
        state = "ok" if self.alive else "dead"
        info = {"index": self.index, "pid": self.process.pid, "state": state, "requests": self.assigned,
                "finished": self.finished, "in_flight": len(self.routes), "outstanding_tokens": self.outstanding()}
        if not self.alive:
            info["exitcode"] = self.process.exitcode
        return {**info, **vars(self.stats)}


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # that event loop is closed
        return False


def replica_devices(device_count: int, replicas: int) -> list[int]:
    """Device index of each replica: one device each while they last, then round robin."""
    return [index % max(device_count, 1) for index in range(replicas)]


class ReplicaPool(SingleRequests):
    """AsyncEngine's interface (submit, generate, stats, ready, close) over N engine processes."""

    def __init__(self, model, backend: str | None, config: EngineConfig, replicas: int, max_waiting: int = 1024,
                 start_timeout: float = 300.0) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        self.max_waiting = max_waiting
        self.lock = threading.Lock()  # routes, pending and liveness, shared by event loops and readers
        self.closing = False
        self._accepting = True
        self._ids = itertools.count()
        self._groups = itertools.count()
        self._owner: dict[str, _Replica] = {}
        ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and torch state
        threads = max(1, (os.cpu_count() or 1) // replicas) if _on_cpu(backend) else None
        devices = replica_devices(backend_class(backend).device_count(), replicas)
        self.replicas: list[_Replica] = []
        for index in range(replicas):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=replica_main, name=f"splitfuse-replica-{index}", daemon=True,
                                  args=(child, model, backend, config, max_waiting, threads, devices[index]))
            process.start()
            child.close()  # only the child holds its end, so its death reads as EOF here
            self.replicas.append(_Replica(self, index, process, parent))
        try:
            infos = [self._wait_ready(r, start_timeout) for r in self.replicas]
        except BaseException:
            self.close(drain=False, timeout=5)
            raise
        self.tokenizer = infos[0]["tokenizer"]
        self.max_model_len = infos[0]["max_model_len"]
        self.sampling_defaults = infos[0]["sampling_defaults"]
        for replica in self.replicas:
            replica.start_reader()

    @staticmethod
    def _wait_ready(replica: _Replica, timeout: float) -> dict:
        if not replica.conn.poll(timeout):
            raise RuntimeError(f"replica {replica.index} did not start within {timeout} s")
        try:
            kind, info = replica.conn.recv()
        except EOFError:
            raise RuntimeError(f"replica {replica.index} exited while starting "
                               f"(code {replica.process.exitcode})") from None
        if kind != "ready":
            raise RuntimeError(f"replica {replica.index} failed to start: {info}")
        return info

    # ---- what the app reads ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True while accepting and at least one replica lives (so /health stays 200 with some dead)."""
        return self._accepting and any(r.alive for r in self.replicas)

    @property
    def stats(self) -> PoolStats:
        live = [r.stats for r in self.replicas if r.alive]
        sums = {name: sum(getattr(s, name) for s in live) for name in vars(Stats())}
        return PoolStats(**sums, replicas=[r.describe() for r in self.replicas])

    def loads(self) -> list[ReplicaLoad]:
        with self.lock:
            return [ReplicaLoad(r.index, r.alive, r.outstanding(), r.assigned) for r in self.replicas]

    # ---- asyncio side ----------------------------------------------------------------------
    async def submit(self, requests: list[tuple[list[int], SamplingParams]], prefix: str | None = None) -> RequestGroup:
        """Send the group (all n choices together) to the least-loaded live replica; admit all or none."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        base = prefix or f"r{next(self._ids)}"
        named = [(list(ids), params, f"{base}-{i}") for i, (ids, params) in enumerate(requests)]
        group_id = next(self._groups)
        future = loop.create_future()
        with self.lock:
            # Pick and reserve under one lock, so concurrent submits see each other's load.
            replica = self.replicas[pick_replica(
                [ReplicaLoad(r.index, r.alive, r.outstanding(), r.assigned) for r in self.replicas])]
            replica.assigned += 1
            for index, (ids, params, rid) in enumerate(named):
                replica.routes[rid] = _Route(loop, queue, index, len(ids), params.max_new_tokens)
                self._owner[rid] = replica
            replica.pending[group_id] = (loop, future, [rid for _, _, rid in named])
        # A failed send needs no handling here: the reader thread sees the death too and settles
        # the future with EngineStopped.
        replica.send(("add", group_id, named))
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else [self._abort(r) for _, _, r in named])
            raise
        except BaseException:
            self._forget([rid for _, _, rid in named])
            raise
        return RequestGroup(self, [rid for _, _, rid in named], queue)

    def _abort(self, request_id: str) -> None:
        """Forwarded to the owning replica; a finished or lost request needs nothing."""
        with self.lock:
            replica = self._owner.pop(request_id, None)
            if replica is None:
                return
            replica.routes.pop(request_id, None)
            alive = replica.alive
        if alive:
            replica.send(("abort", request_id))

    def _forget(self, rids: list[str]) -> None:
        with self.lock:
            for rid in rids:
                self._owner.pop(rid, None)

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting; replicas finish (drain) or abort their requests, then exit; join them."""
        self._accepting = False
        self.closing = True
        for replica in self.replicas:
            if replica.process.is_alive():
                replica.send(("close", drain))
        for replica in self.replicas:
            replica.process.join(timeout)
            if replica.process.is_alive():
                log.warning("replica %d did not stop in %s s; killing it", replica.index, timeout)
                replica.process.kill()
                replica.process.join(5)
            if replica.thread is not None:
                replica.thread.join(5)
            replica.conn.close()


def _on_cpu(backend: str | None) -> bool:
    if backend == "cpu":
        return True
    if backend in (None, "auto"):
        import torch

        return not torch.cuda.is_available()
    return False
