"""ReplicaPool: N engines behind AsyncEngine's interface, routed by outstanding tokens.

The HTTP process keeps the tokenizer; each replica owns one Engine, in a local process
(replica_worker.ProcessEngine) or a Ray actor (ray_replicas.RayEngine): the pool needs only the
handle's launch / wait_ready / send / receive / join. Each request group goes to the live replica
with the fewest outstanding tokens (prompt tokens not yet computed + new tokens not yet generated),
counted here as outputs arrive. Round robin (MII) ignores that one long prompt can cost as much as
many short ones. One queue limit covers the pool, by the single engine's rules (limits.py): a group
that would leave more than max_waiting requests that no replica could admit now is refused
(QueueFull), one larger than a replica could ever queue too (GroupTooLarge).

When a replica dies, no request is lost that has not sent its client anything:
- a group none of whose requests has produced an output is resent to another live replica, and its
  caller never notices (counted in `retries`);
- so is a replayable group (its consumer sends nothing before the end: a non-streaming HTTP
  request), each resent choice announced by (index, Replayed) so its consumer drops what it had;
- other requests that had produced output fail with ReplicaLost (an error event in a stream),
  their sibling choices with them;
- the replica is launched again and rejoins rotation once its engine is ready (`restarts`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splitfuse.backends.selection import backend_class
from splitfuse.config import EngineConfig
from splitfuse.core.engine import EngineStats
from splitfuse.serving.bridge import EngineFront, Replayed
from splitfuse.serving.errors import EngineStopped, ReplicaLost
from splitfuse.serving.limits import blocks_for, refusal, unadmitted
from splitfuse.serving.loop import Abort, AddGroup, Close
from splitfuse.serving.replica_worker import ProcessEngine
from splitfuse.serving.routes import Route, Routes, call_soon, settle

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


class _Resent:
    """Stands in for the admission future of a resent group, whose caller already holds its
    RequestGroup: a refusal fails the group's requests instead."""

    def __init__(self, routes: list[Route], why: str) -> None:
        self.routes, self.why = routes, why

    def done(self) -> bool:
        return False

    def set_result(self, result) -> None:
        pass

    def set_exception(self, error: BaseException) -> None:
        for route in self.routes:
            route.queue.put_nowait((route.index, ReplicaLost(f"{self.why}, and no replica could take this "
                                                             f"request over ({error}); retry")))


def _tokens_held(route: Route) -> int:
    """Tokens a started request holds KV for: its prompt and what it has generated so far."""
    ids, params = route.request
    return len(ids) + params.max_new_tokens - route.new_left


class _Replica:
    """Front-end half of one replica: its engine handle, a reader thread, the routes of its requests.

    state: "starting", "ok" (in rotation), "restarting" (died; being launched again), "failed" (could
    not be launched again), "stopped" (closed with the pool)."""

    def __init__(self, pool: ReplicaPool, index: int, engine) -> None:
        self.pool, self.index, self.engine = pool, index, engine
        self.state = "starting"
        self.routing = Routes(pool.lock)
        self.stats = EngineStats()
        self.settings = None  # EngineSettings its engine reported once ready (launched again: anew)
        self.assigned = 0
        self.restarts = 0
        self.thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self.state == "ok"

    @property
    def routes(self) -> dict[str, Route]:
        """Its requests in flight, by id."""
        return self.routing.routes

    def load(self) -> ReplicaLoad:
        """The router's view; the caller holds the pool's lock."""
        return ReplicaLoad(self.index, self.alive, self.routing.outstanding(), self.assigned)

    def backlog(self, max_seqs: int, new_prompts: Sequence[list[int]] = ()) -> int:
        """Its requests without an output (then new_prompts) beyond what its free slots and KV blocks
        would admit now; the caller holds the pool's lock.

        Counted from its routes, which are current, rather than its published stats, which lag a burst:
        a started request holds a slot and the blocks of its prompt and tokens so far (a shared prefix
        counts once per request, so the estimate errs towards refusing)."""
        size = self.settings.block_size
        started = [route for route in self.routes.values() if route.started]
        held = sum(blocks_for(_tokens_held(route), size) for route in started)
        lengths = [len(route.request[0]) for route in self.routes.values() if not route.started]
        return unadmitted(lengths + [len(ids) for ids in new_prompts], max_seqs - len(started),
                          self.settings.num_kv_blocks - held, size)

    def start_reader(self) -> None:
        self.thread = threading.Thread(target=self._serve, name=f"splitfuse-replica-{self.index}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        """The reader thread: deliver what the engine reports; when it dies, resend or fail its
        requests and launch it again, until the pool closes."""
        while True:
            self._read()
            if not self._died() or not self._relaunch():
                return

    def _read(self) -> None:
        for message in self.engine.receive():
            kind = message[0]
            if kind == "outputs":
                self.stats = message[2]
                for request_id in self.routing.deliver(message[1]):
                    self.pool.abort(request_id)  # the client's loop is closed; nobody is listening
            elif kind == "stats":
                self.stats = message[1]
            elif kind == "admitted":
                self.routing.admitted(message[1], message[2])

    def _died(self) -> bool:
        """Out of rotation, its figures zeroed; its requests resent or failed. True: launch it again."""
        with self.pool.lock:
            closing = self.pool.closing
            self.state = "stopped" if closing else "restarting"
            self.stats = EngineStats()
            routes, self.routing.routes = self.routing.routes, {}
            pending, self.routing.pending = self.routing.pending, {}
        reason = self.engine.exit_reason()
        why = f"replica {self.index} ({reason}) died while serving this request"
        if closing:
            self.pool.fail(routes, pending, why)
            return False
        resent, failed = self.pool.recover(routes, pending, why)
        log.error("replica %d (pid %s) died: %s; %d requests resent to other replicas, %d failed",
                  self.index, self.engine.pid, reason, resent, failed)
        return True

    def _relaunch(self) -> bool:
        try:
            self.engine.launch()
            self.settings = self.engine.wait_ready(self.pool.start_timeout)["settings"]
        except Exception as exc:  # noqa: BLE001 - reported, and the replica stays out of rotation
            with self.pool.lock:
                self.state = "stopped" if self.pool.closing else "failed"
            if self.state == "failed":
                log.error("replica %d could not be launched again: %s", self.index, exc)
            return False
        with self.pool.lock:
            closing = self.pool.closing
            if not closing:
                self.state = "ok"
                self.restarts += 1
        if closing:  # the pool closed while this one started: nothing is left for it to serve
            self.engine.send(Close(drain=False))
            self.engine.join(5)
            self.state = "stopped"
            return False
        log.warning("replica %d is back (pid %s)", self.index, self.engine.pid)
        return True

    def describe(self) -> dict:
        """Its state for /health: routing figures and, while it lives, its engine's latest stats."""
        with self.pool.lock:
            in_flight, outstanding = len(self.routes), self.routing.outstanding()
        return {"index": self.index, "pid": self.engine.pid, "state": self.state, "restarts": self.restarts,
                "requests": self.assigned, "finished": self.routing.num_finished, "in_flight": in_flight,
                "outstanding_tokens": outstanding, **vars(self.stats)}


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
    """AsyncEngine's interface (submit, generate, abort, stats, ready, close) over N engines.

    engines: a handle per replica (default: local processes of `model` on `backend`)."""

    def __init__(self, model, backend: str | None, config: EngineConfig, replicas: int, max_waiting: int = 1024,
                 start_timeout: float = 300.0, engines: Callable[[int], object] | None = None) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        super().__init__()
        self.max_waiting = max_waiting
        self.max_seqs = config.max_seqs  # each replica's sequence slots
        self.start_timeout = start_timeout
        self.closing = False
        self.retries = 0  # requests resent after their replica died
        if engines is None:
            placement = place_replicas(backend, replicas, tensor_parallel_size=config.tensor_parallel_size)
            # The pool alone limits the queue, so a replica never turns away what the pool admitted.
            engines = lambda index: ProcessEngine(index, (model, backend, config, sys.maxsize,  # noqa: E731
                                                          placement.threads, placement.devices[index]))
        self.replicas = [_Replica(self, index, engines(index)) for index in range(replicas)]
        try:
            for replica in self.replicas:
                replica.engine.launch()
            infos = [replica.engine.wait_ready(start_timeout) for replica in self.replicas]
        except BaseException:
            self.close(drain=False, timeout=5)
            raise
        self.tokenizer = infos[0]["tokenizer"]
        self.settings = infos[0]["settings"]
        self.max_model_len = infos[0]["max_model_len"]
        self.sampling_defaults = infos[0]["sampling_defaults"]
        for replica, info in zip(self.replicas, infos):
            replica.settings = info["settings"]
            replica.state = "ok"
            replica.start_reader()

    # ---- what the app reads ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True while accepting and at least one replica lives (so /health stays 200 with some dead)."""
        return self._accepting and any(r.alive for r in self.replicas)

    @property
    def restarts(self) -> int:
        """Replicas launched again after dying, since start."""
        return sum(r.restarts for r in self.replicas)

    @property
    def stats(self) -> PoolStats:
        live = [r.stats for r in self.replicas if r.alive]
        sums = {name: sum(getattr(s, name) for s in live) for name in vars(EngineStats())}
        return PoolStats(**sums, replicas=[r.describe() for r in self.replicas])

    def loads(self) -> list[ReplicaLoad]:
        with self.lock:
            return [r.load() for r in self.replicas]

    def num_unstarted(self) -> int:
        """Requests without an output yet, over all replicas; the caller holds the lock."""
        return sum(not route.started for r in self.replicas for route in r.routes.values())

    # ---- callers' side ---------------------------------------------------------------------
    def dispatch(self, group, loop, queue, admitted) -> None:
        """To the least-loaded live replica, all n choices together."""
        with self.lock:
            # Pick, count and reserve under one lock, so concurrent submits see each other's load.
            replica = self.replicas[pick_replica([r.load() for r in self.replicas])]
            prompts = [ids for ids, _, _ in group.requests]
            waiting = sum(r.backlog(self.max_seqs, prompts if r is replica else ()) for r in self.replicas)
            error = refusal(len(group.requests), self.max_seqs, waiting, self.max_waiting)
            if error is not None:
                admitted.set_exception(error)
                return
            replica.assigned += 1
            replica.routing.open(group.group_id, group.requests, loop, queue, admitted)
        # A failed send needs no handling here: the reader thread sees the death too and resends it.
        replica.engine.send(group)

    def abort(self, request_id: str) -> None:
        """Forwarded to the replica that holds the request; a finished or lost one needs nothing."""
        for replica in self.replicas:
            if replica.routing.drop(request_id):
                if replica.alive:
                    replica.engine.send(Abort(request_id))
                return

    # ---- a replica died (its reader thread calls these) ------------------------------------
    def recover(self, routes: dict[str, Route], pending: dict, why: str) -> tuple[int, int]:
        """Resend each group none of whose requests started (groups still waiting for admission
        among them) and each replayable one; fail the others with ReplicaLost. Returns (requests
        resent, requests failed)."""
        waiting = {rid for group in pending.values() for rid in group.request_ids}
        groups: dict[int, dict[str, Route]] = {}  # each caller's group has its own queue
        for rid, route in routes.items():
            if rid not in waiting:
                groups.setdefault(id(route.queue), {})[rid] = route
        resent = failed = 0
        for group in groups.values():
            first = next(iter(group.values()))
            started = any(route.started for route in group.values())
            if started and not first.queue.replayable:
                failed += self._fail_routes(group, ReplicaLost(f"{why}; retry"))
                continue
            if started:  # its consumer has sent nothing yet: run the choices again from scratch
                for route in group.values():
                    route.prompt_left, route.new_left = len(route.request[0]), route.request[1].max_new_tokens
                    call_soon(route.loop, route.queue.put_nowait, (route.index, Replayed))
            resent += self._resend(group, first.loop, _Resent(list(group.values()), why))
        for group in pending.values():
            members = {rid: routes[rid] for rid in group.request_ids if rid in routes}
            resent += self._resend(members, group.loop, group.future)
        return resent, failed

    def fail(self, routes: dict[str, Route], pending: dict, why: str) -> None:
        """The pool is closing: no retry; every request and waiting group fails."""
        for group in pending.values():
            call_soon(group.loop, settle, group.future, EngineStopped(f"{why}; the server is shutting down"))
        self._fail_routes(routes, ReplicaLost(f"{why}; retry"))

    @staticmethod
    def _fail_routes(routes: dict[str, Route], error: Exception) -> int:
        for route in routes.values():
            call_soon(route.loop, route.queue.put_nowait, (route.index, error))
        return len(routes)

    def _resend(self, routes: dict[str, Route], loop, admitted) -> int:
        """One group to the least-loaded live replica under a new group id; refused (admitted
        settles with EngineStopped) when none lives."""
        if not routes:
            call_soon(loop, settle, admitted, None)  # every request of it was aborted meanwhile
            return 0
        with self.lock:
            try:
                replica = self.replicas[pick_replica([r.load() for r in self.replicas])]
            except EngineStopped as exc:
                replica, refusal = None, exc
            else:
                group_id = next(self._groups)
                replica.assigned += 1
                replica.routing.adopt(group_id, routes, loop, admitted)
                self.retries += len(routes)
        if replica is None:
            call_soon(loop, settle, admitted, refusal)
            return 0
        replica.engine.send(AddGroup(group_id, [(*route.request, rid) for rid, route in routes.items()]))
        return len(routes)

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting; replicas finish (drain) or abort their requests, then exit; join them."""
        self._accepting = False
        with self.lock:
            self.closing = True
        for replica in self.replicas:
            if replica.state in ("ok", "starting"):
                replica.engine.send(Close(drain))
        for replica in self.replicas:
            replica.engine.join(timeout)
            if replica.thread is not None:
                replica.thread.join(5)
