"""AsyncEngine: one Engine stepped in its own thread, fed and drained from asyncio."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from splitfuse.config import SamplingParams
from splitfuse.core.engine import Engine
from splitfuse.core.request import RequestOutput

log = logging.getLogger("splitfuse.serving")


class QueueFull(RuntimeError):
    """Too many requests are waiting; the client should retry later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


class EngineError(RuntimeError):
    """A step failed while this request was in it; the request was aborted (HTTP 500)."""


class ReplicaLost(EngineError):
    """The replica process serving this request exited; other replicas still serve (HTTP 503)."""


@dataclass
class _Add:
    requests: list[tuple[list[int], SamplingParams, str]]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    admitted: asyncio.Future


@dataclass
class _Route:
    """Where the engine thread delivers one request's outputs."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int


@dataclass
class Stats:
    """Snapshot published by the engine thread; replaced whole, so readers need no lock."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    steps: int = 0


@dataclass
class RequestGroup:
    """Outputs of requests admitted together (n choices), as (index, RequestOutput) pairs."""

    engine: AsyncEngine
    request_ids: list[str]
    queue: asyncio.Queue
    _open: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._open = set(self.request_ids)

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._open:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:
            self.abort()  # cancelled while waiting: the client went away
            raise
        index, payload = item
        if isinstance(payload, BaseException):
            self.abort()  # the sibling choices cannot make a complete response either
            raise payload
        if payload.finished:
            self._open.discard(payload.request_id)
        return index, payload

    def abort(self) -> None:
        """Abort every request of the group that has not finished; safe to call twice."""
        for rid in self._open:
            self.engine._abort(rid)
        self._open.clear()

    async def aclose(self) -> None:
        self.abort()


class SingleRequests:
    """`generate()` for one request on top of a class's `submit()` (AsyncEngine, ReplicaPool)."""

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; stopping the iteration early aborts it."""
        group = await self.submit([(prompt_ids, params)], request_id)
        try:
            async for _, out in group:
                yield out
        finally:
            group.abort()


class AsyncEngine(SingleRequests):
    """Thread-safe front of an Engine: requests from any event loop, one stepping thread."""

    def __init__(self, engine: Engine, max_waiting: int = 1024) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.stats = Stats()
        self._cond = threading.Condition()
        self._commands: list = []  # _Add or ("abort", id), applied between steps
        self._routes: dict[str, _Route] = {}
        self._ids = itertools.count()
        self._accepting = True
        self._stopping = False
        self._closed = False
        self._steps = 0
        self._publish()
        self._thread = threading.Thread(target=self._run, name="splitfuse-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread.is_alive()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def sampling_defaults(self) -> dict:
        return self.engine.sampling_defaults

    # ---- asyncio side ----------------------------------------------------------------------
    async def submit(self, requests: list[tuple[list[int], SamplingParams]], prefix: str | None = None) -> RequestGroup:
        """Admit all requests or none; raises ValueError (bad request), QueueFull or EngineStopped."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        base = prefix or f"r{next(self._ids)}"
        named = [(ids, params, f"{base}-{i}") for i, (ids, params) in enumerate(requests)]
        command = _Add(named, loop, queue, loop.create_future())
        self._send(command)
        try:
            # shield: a cancelled caller must not leave admitted requests behind; abort them instead.
            await asyncio.shield(command.admitted)
        except asyncio.CancelledError:
            command.admitted.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else [self._abort(r) for _, _, r in named])
            raise
        return RequestGroup(self, [rid for _, _, rid in named], queue)

    def _abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, command) -> None:
        with self._cond:
            if self._closed:
                if isinstance(command, tuple):
                    return  # an abort after shutdown: nothing left to free
                raise EngineStopped("the engine has stopped")
            self._commands.append(command)
            self._cond.notify()

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting; with drain let running requests finish, else abort them; join the thread."""
        self._accepting = False
        with self._cond:
            self._stopping = True
            if not drain:
                self._commands.extend(("abort", rid) for rid in list(self._routes))
            self._cond.notify()
        self._thread.join(timeout)

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self.engine.has_unfinished() and not self._stopping:
                    self._cond.wait()
                commands, self._commands = self._commands, []
            for command in commands:
                self._apply(command)
            self._publish()
            if self._stopping and not self.engine.has_unfinished():
                with self._cond:
                    if not self._commands:
                        self._closed = True  # under the lock: no command can slip in unseen
                        return
                continue
            if self.engine.has_unfinished():
                self._step()

    def _apply(self, command) -> None:
        if isinstance(command, tuple):  # ("abort", request_id)
            self.engine.abort(command[1])
            self._routes.pop(command[1], None)
            return
        try:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.engine.scheduler.waiting) + len(command.requests) > self.max_waiting:
                raise QueueFull(f"{len(self.engine.scheduler.waiting)} requests are waiting "
                                f"(max_waiting={self.max_waiting}); retry later")
            added = []
            try:
                for index, (ids, params, rid) in enumerate(command.requests):
                    self.engine.add_request(ids, params, rid)
                    added.append(rid)
                    self._routes[rid] = _Route(command.loop, command.queue, index)
            except BaseException:
                for rid in added:  # all or none
                    self.engine.abort(rid)
                    self._routes.pop(rid, None)
                raise
        except Exception as exc:
            command.loop.call_soon_threadsafe(_settle, command.admitted, exc)
        else:
            command.loop.call_soon_threadsafe(_settle, command.admitted, None)

    def _step(self) -> None:
        self._steps += 1
        outputs = step_engine(self.engine)
        # Publish before delivering: a client that reacts to an output must not then read stats
        # older than that output (e.g. blocks already free while its request still holds them).
        self._publish()
        for rid, payload in outputs:
            self._deliver(rid, payload)

    def _deliver(self, request_id: str, payload) -> None:
        route = self._routes.get(request_id)
        if route is None:
            return  # aborted by its client while the step ran
        if isinstance(payload, BaseException) or payload.finished:
            del self._routes[request_id]
        try:
            route.loop.call_soon_threadsafe(route.queue.put_nowait, (route.index, payload))
        except RuntimeError:  # the client's event loop is closed; nobody is listening
            self.engine.abort(request_id)

    def _publish(self) -> None:
        self.stats = engine_stats(self.engine, self._steps)


def step_engine(engine: Engine) -> list[tuple[str, RequestOutput | EngineError]]:
    """One engine step as (request_id, output) pairs. If the step raises, the engine cannot say
    which sequence broke it: the sequences it was running (whose state the failed step may have
    left half-updated) are aborted and get an EngineError each; the rest keep being served."""
    try:
        return [(out.request_id, out) for out in engine.step()]
    except Exception as exc:
        log.exception("engine step failed")
        failed = [seq.request_id for seq in engine.scheduler.running]
        for rid in failed:
            engine.abort(rid)
        error = EngineError(f"the engine failed on this request: {exc}")
        return [(rid, error) for rid in failed]


def engine_stats(engine: Engine, steps: int) -> Stats:
    """A snapshot of the engine's queues and KV blocks."""
    blocks = engine.blocks
    return Stats(
        running=len(engine.scheduler.running), waiting=len(engine.scheduler.waiting),
        kv_blocks_used=blocks.num_used, kv_blocks_total=blocks.num_blocks, kv_blocks_free=blocks.num_free,
        steps=steps,
    )


def _settle(future: asyncio.Future, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
