"""AsyncEngine: one Engine stepped in its own thread, fed and drained from asyncio.

EngineFront holds what AsyncEngine and ReplicaPool (replicas.py) share: naming a group of requests,
waiting for its admission, and handing back a RequestGroup of its outputs.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from splitfuse.config import SamplingParams
from splitfuse.core.engine import Engine, EngineSettings, EngineStats
from splitfuse.core.request import RequestOutput
from splitfuse.serving.errors import EngineClosed, EngineError, EngineStopped, QueueFull, ReplicaLost
from splitfuse.serving.loop import Abort, AddGroup, Close, Command, EngineLoop, Outputs
from splitfuse.serving.routes import Routes

log = logging.getLogger("splitfuse.serving")

__all__ = ["AsyncEngine", "EngineClosed", "EngineError", "EngineFront", "EngineStopped", "QueueFull",
           "ReplicaLost", "Replayed", "RequestGroup"]


class Replayed:
    """Yielded as (index, Replayed) by a replayable group: choice `index` starts over on another
    engine, so its outputs so far are void."""


class GroupQueue(asyncio.Queue):
    """The outputs of one group; replayable: its consumer shows nothing before the end, so a choice
    may be run again from scratch when its engine dies."""

    replayable = False


@dataclass
class RequestGroup:
    """Outputs of requests admitted together (n choices), as (index, RequestOutput) pairs."""

    engine: EngineFront
    request_ids: list[str]
    queue: GroupQueue
    _open: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._open = set(self.request_ids)

    @property
    def replayable(self) -> bool:
        return self.queue.replayable

    @replayable.setter
    def replayable(self, value: bool) -> None:
        """Set by a consumer that sends nothing before the end: a replica's death then replays its
        choices elsewhere (each announced by (index, Replayed)) instead of failing them."""
        self.queue.replayable = value

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
        if payload is not Replayed and payload.finished:
            self._open.discard(payload.request_id)
        return index, payload

    def abort(self) -> None:
        """Abort every request of the group that has not finished; safe to call twice."""
        for rid in self._open:
            self.engine.abort(rid)
        self._open.clear()

    async def aclose(self) -> None:
        self.abort()


class EngineFront(abc.ABC):
    """submit() and generate() over engines fed through AddGroup commands; a subclass routes the
    group (dispatch) and aborts requests (abort), and says what the app reads below."""

    tokenizer: object
    settings: EngineSettings
    max_model_len: int
    sampling_defaults: dict  # the model's generation_config.json values
    stats: EngineStats  # the latest the engine published
    ready: bool  # accepting requests and able to serve them
    max_waiting: int
    restarts: int = 0  # engines launched again after dying (replica pools)
    retries: int = 0  # requests resent to another engine after theirs died (replica pools)

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the routes of every engine behind this front
        self._accepting = True
        self._ids = itertools.count()
        self._groups = itertools.count()

    async def submit(self, requests: list[tuple[list[int], SamplingParams]], prefix: str | None = None) -> RequestGroup:
        """Admit all requests or none; raises ValueError (bad request), QueueFull or EngineStopped."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        loop = asyncio.get_running_loop()
        queue = GroupQueue()
        base = prefix or f"r{next(self._ids)}"
        group = AddGroup(next(self._groups), [(list(ids), params, f"{base}-{i}")
                                              for i, (ids, params) in enumerate(requests)])
        request_ids = [rid for _, _, rid in group.requests]
        admitted = loop.create_future()
        self.dispatch(group, loop, queue, admitted)
        try:
            # shield: a cancelled caller must not leave admitted requests behind; abort them instead.
            await asyncio.shield(admitted)
        except asyncio.CancelledError:
            admitted.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else [self.abort(r) for r in request_ids])
            raise
        return RequestGroup(self, request_ids, queue)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; stopping the iteration early aborts it."""
        group = await self.submit([(prompt_ids, params)], request_id)
        try:
            async for _, out in group:
                yield out
        finally:
            group.abort()

    @abc.abstractmethod
    def dispatch(self, group: AddGroup, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
                 admitted: asyncio.Future) -> None:
        """Route the group's outputs to queue and send it to an engine; admitted settles once the
        engine has queued it (or refused it)."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; a finished or unknown one needs nothing."""


class CommandQueue:
    """Commands from any thread to the engine thread, under a condition variable."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._commands: list[Command] = []
        self._closed = False

    def put(self, command: Command) -> None:
        with self._cond:
            if self._closed:
                raise EngineStopped("the engine has stopped")
            self._commands.append(command)
            self._cond.notify()

    def take(self, block: bool) -> list[Command]:
        with self._cond:
            while block and not self._commands:
                self._cond.wait()
            commands, self._commands = self._commands, []
        return commands

    def close(self) -> list[Command]:
        with self._cond:  # under the lock: no command can slip in unseen
            self._closed = True
            commands, self._commands = self._commands, []
        return commands


class AsyncEngine(EngineFront):
    """Thread-safe front of an Engine: requests from any event loop, one stepping thread."""

    def __init__(self, engine: Engine, max_waiting: int = 1024) -> None:
        super().__init__()
        self.engine = engine
        self.stats: EngineStats = engine.stats()  # replaced whole by the engine thread: readers need no lock
        self._routes = Routes(self.lock)
        self._commands = CommandQueue()
        self._loop = EngineLoop(engine, self._commands, self, max_waiting)
        self._thread = threading.Thread(target=self._serve, name="splitfuse-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """The engine thread: the loop until it is closed; were it to die, no caller is left waiting."""
        try:
            self._loop.run()
        except Exception:  # a bug outside the engine's step: reported here, callers get errors below
            log.exception("the engine loop stopped")
        finally:
            self._commands.close()
            self._routes.fail_all(EngineError("the engine stopped while serving this request"),
                                  EngineStopped("the engine has stopped"))

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread.is_alive()

    @property
    def max_waiting(self) -> int:
        return self._loop.max_waiting

    @max_waiting.setter
    def max_waiting(self, value: int) -> None:
        self._loop.max_waiting = value

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def settings(self) -> EngineSettings:
        return self.engine.settings

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def sampling_defaults(self) -> dict:
        return self.engine.sampling_defaults

    # ---- callers' side ---------------------------------------------------------------------
    def dispatch(self, group, loop, queue, admitted) -> None:
        with self.lock:
            self._routes.open(group.group_id, group.requests, loop, queue, admitted)
        try:
            self._commands.put(group)
        except EngineStopped:
            self._routes.admitted(group.group_id, EngineStopped("the server is shutting down"))

    def abort(self, request_id: str) -> None:
        self._routes.drop(request_id)
        try:
            self._commands.put(Abort(request_id))
        except EngineStopped:
            pass  # the engine has stopped: nothing is left to free

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting; with drain let running requests finish, else abort them; join the thread."""
        self._accepting = False
        try:
            self._commands.put(Close(drain))
        except EngineStopped:
            pass  # closed already
        self._thread.join(timeout)

    # ---- the engine thread reports here (EngineLoop's sink) --------------------------------
    def admitted(self, group_id: int, error: Exception | None) -> None:
        self._routes.admitted(group_id, error)

    def outputs(self, outputs: Outputs, stats: EngineStats) -> None:
        # Publish before delivering: a client that reacts to an output must not then read stats
        # older than that output (e.g. blocks already free while its request still holds them).
        self.stats = stats
        for request_id in self._routes.deliver(outputs):
            self.abort(request_id)  # the client's event loop is closed; nobody is listening

    def publish(self, stats: EngineStats) -> None:
        self.stats = stats
