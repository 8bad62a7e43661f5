"""ReplicaPool: N engine processes behind AsyncEngine's interface, routed by outstanding tokens.

The HTTP process keeps the tokenizer; each replica process owns one Engine (replica_worker.py).
Each request group goes to the live replica with the fewest outstanding tokens (prompt tokens not
yet computed + new tokens not yet generated), counted here as outputs arrive. Round robin (MII)
ignores that one long prompt can cost as much as many short ones.

A replica whose process exits is taken out of rotation: its in-flight requests fail with
ReplicaLost (HTTP 503), new requests go to the others, and the pool stays ready while one lives.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from splitfuse.backends.selection import backend_class
from splitfuse.config import EngineConfig
from splitfuse.core.engine import EngineStats
from splitfuse.serving.bridge import EngineFront
from splitfuse.serving.errors import EngineStopped, ReplicaLost
from splitfuse.serving.loop import Abort, Close
from splitfuse.serving.replica_worker import replica_main
from splitfuse.serving.routes import Route, Routes

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


@dataclass(frozen=True)
class PoolStats(EngineStats):
    """Sums over live replicas, plus each replica's own state (shown by /health)."""

    replicas: list[dict] = field(default_factory=list)


class _Replica:
    """Front-end half of one replica: the pipe, a reader thread, and the routes of its requests."""

    def __init__(self, pool: ReplicaPool, index: int, process, conn) -> None:
        self.pool, self.index, self.process, self.conn = pool, index, process, conn
        self.alive = True
        self.routing = Routes(pool.lock)
        self.stats = EngineStats()
        self.assigned = 0
        self._send_lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @property
    def routes(self) -> dict[str, Route]:
        """Its requests in flight, by id."""
        return self.routing.routes

    def load(self) -> ReplicaLoad:
        """The router's view; the caller holds the pool's lock."""
        return ReplicaLoad(self.index, self.alive, self.routing.outstanding(), self.assigned)

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
                for request_id in self.routing.deliver(message[1]):
                    self.pool.abort(request_id)  # the client's loop is closed; nobody is listening
            elif kind == "stats":
                self.stats = message[1]
            elif kind == "admitted":
                self.routing.admitted(message[1], message[2])
        self._died()

    def _died(self) -> None:
        """Out of rotation; fail everything it held (ReplicaLost -> 503) so no client waits forever."""
        with self.pool.lock:
            self.alive = False
        self.process.join(5)
        code = self.process.exitcode
        lost = ReplicaLost(f"replica {self.index} exited (code {code}) while serving this request; retry")
        failed = self.routing.fail_all(lost, EngineStopped(str(lost)))
        if not self.pool.closing:
            log.error("replica %d (pid %s) exited with code %s; %d requests failed", self.index,
                      self.process.pid, code, failed)

    def describe(self) -> dict:
        state = "ok" if self.alive else "dead"
        with self.pool.lock:
            in_flight, outstanding = len(self.routes), self.routing.outstanding()
        info = {"index": self.index, "pid": self.process.pid, "state": state, "requests": self.assigned,
                "finished": self.routing.num_finished, "in_flight": in_flight, "outstanding_tokens": outstanding}
        if not self.alive:
            info["exitcode"] = self.process.exitcode
        return {**info, **vars(self.stats)}


def replica_devices(device_count: int, replicas: int, tensor_parallel_size: int = 1) -> list[int]:
    """First device index of each replica, whose tensor-parallel ranks take that many devices from
    it: disjoint devices while they last, then round robin."""
    return [index * tensor_parallel_size % max(device_count, 1) for index in range(replicas)]


@dataclass(frozen=True)
class ReplicaPlacement:
    """Where the replicas run: torch threads each (None: torch's own choice) and device indices."""

    threads: int | None
    devices: list[int]


def place_replicas(backend: str | None, replicas: int, cpu_count: int | None = None,
                   tensor_parallel_size: int = 1) -> ReplicaPlacement:
    """Ask the backend class (named, SPLITFUSE_BACKEND, or auto) where it runs: replicas on the CPU
    share its cores evenly (each rank of each), replicas on devices spread over them."""
    cls = backend_class(backend)
    threads = None
    if cls.device_type() == "cpu":
        threads = max(1, (cpu_count or os.cpu_count() or 1) // (replicas * tensor_parallel_size))
    return ReplicaPlacement(threads, replica_devices(cls.device_count(), replicas, tensor_parallel_size))


class ReplicaPool(EngineFront):
    """AsyncEngine's interface (submit, generate, abort, stats, ready, close) over N engine processes."""

    def __init__(self, model, backend: str | None, config: EngineConfig, replicas: int, max_waiting: int = 1024,
                 start_timeout: float = 300.0) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        super().__init__()
        self.max_waiting = max_waiting
        self.closing = False
        ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and torch state
        placement = place_replicas(backend, replicas, tensor_parallel_size=config.tensor_parallel_size)
        self.replicas: list[_Replica] = []
        for index in range(replicas):
            parent, child = ctx.Pipe()
            # a daemonic process may not start children, and a tensor-parallel replica starts its
            # worker ranks; a replica exits on its own once its pipe closes, daemonic or not
            process = ctx.Process(target=replica_main, name=f"splitfuse-replica-{index}",
                                  daemon=config.tensor_parallel_size == 1,
                                  args=(child, model, backend, config, max_waiting, placement.threads,
                                        placement.devices[index]))
            process.start()
            child.close()  # only the child holds its end, so its death reads as EOF here
            self.replicas.append(_Replica(self, index, process, parent))
        try:
            infos = [self._wait_ready(r, start_timeout) for r in self.replicas]
        except BaseException:
            self.close(drain=False, timeout=5)
            raise
        self.tokenizer = infos[0]["tokenizer"]
        self.settings = infos[0]["settings"]
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
        sums = {name: sum(getattr(s, name) for s in live) for name in vars(EngineStats())}
        return PoolStats(**sums, replicas=[r.describe() for r in self.replicas])

    def loads(self) -> list[ReplicaLoad]:
        with self.lock:
            return [r.load() for r in self.replicas]

    # ---- callers' side ---------------------------------------------------------------------
    def dispatch(self, group, loop, queue, admitted) -> None:
        """To the least-loaded live replica, all n choices together."""
        with self.lock:
            # Pick and reserve under one lock, so concurrent submits see each other's load.
            replica = self.replicas[pick_replica([r.load() for r in self.replicas])]
            replica.assigned += 1
            replica.routing.open(group.group_id, group.requests, loop, queue, admitted)
        # A failed send needs no handling here: the reader thread sees the death too and settles
        # the future with EngineStopped.
        replica.send(group)

    def abort(self, request_id: str) -> None:
        """Forwarded to the replica that holds the request; a finished or lost one needs nothing."""
        for replica in self.replicas:
            if replica.routing.drop(request_id):
                if replica.alive:
                    replica.send(Abort(request_id))
                return

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting; replicas finish (drain) or abort their requests, then exit; join them."""
        self._accepting = False
        self.closing = True
        for replica in self.replicas:
            if replica.process.is_alive():
                replica.send(Close(drain))
        for replica in self.replicas:
            replica.process.join(timeout)
            if replica.process.is_alive():
                log.warning("replica %d did not stop in %s s; killing it", replica.index, timeout)
                replica.process.kill()
                replica.process.join(5)
            if replica.thread is not None:
                replica.thread.join(5)
            replica.conn.close()
