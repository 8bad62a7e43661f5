"""Where each request's outputs go: the asyncio queue of the caller that submitted it.

A front end keeps one Routes per engine (AsyncEngine: its one engine; ReplicaPool: one per replica,
all under the pool's lock) and feeds it what that engine's loop reports."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from splitfuse.config import SamplingParams
from splitfuse.serving.loop import Outputs


@dataclass
class Route:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int  # the request's place in its group (the n choices of one HTTP request)
    prompt_left: int  # cleared by the request's first output: its prompt is then computed
    new_left: int
    request: tuple[list[int], SamplingParams] | None = None  # kept so a replica pool can resend it

    @property
    def started(self) -> bool:
        """True once an output has come back (the prompt is never empty)."""
        return self.prompt_left == 0

    @property
    def outstanding(self) -> int:
        """Tokens still to compute: unprefilled prompt + ungenerated max_new_tokens."""
        return self.prompt_left + self.new_left


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    request_ids: list[str]


class Routes:
    """Routes of one engine's requests and the groups waiting for admission there."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock  # may be shared by several Routes
        self.routes: dict[str, Route] = {}
        self.pending: dict[int, _Pending] = {}
        self.num_finished = 0  # requests that ended here (finished or failed)

    def open(self, group_id: int, requests: list[tuple[list[int], SamplingParams, str]],
             loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, admitted: asyncio.Future) -> None:
        """Route a group before it is sent to the engine; the caller holds the lock."""
        for index, (ids, params, request_id) in enumerate(requests):
            self.routes[request_id] = Route(loop, queue, index, len(ids), params.max_new_tokens, (ids, params))
        self.pending[group_id] = _Pending(loop, admitted, [rid for _, _, rid in requests])

    def adopt(self, group_id: int, routes: dict[str, Route], loop: asyncio.AbstractEventLoop,
              admitted) -> None:
        """Take over a group resent from an engine that died, routes and all; the caller holds the lock."""
        self.routes.update(routes)
        self.pending[group_id] = _Pending(loop, admitted, list(routes))

    def outstanding(self) -> int:
        """Tokens the engine still owes these requests; the caller holds the lock."""
        return sum(route.outstanding for route in self.routes.values())

    def drop(self, request_id: str) -> bool:
        """Forget a request whose caller aborted it; False if it had already ended."""
        with self.lock:
            return self.routes.pop(request_id, None) is not None

    def admitted(self, group_id: int, error: Exception | None) -> None:
        """Settle the group's admission; a refused group's routes go."""
        with self.lock:
            pending = self.pending.pop(group_id, None)
            if pending is None:
                return
            if error is not None:
                for request_id in pending.request_ids:
                    self.routes.pop(request_id, None)
        call_soon(pending.loop, settle, pending.future, error)

    def deliver(self, outputs: Outputs) -> list[str]:
        """Hand each output to its caller; returns the ids nobody listens to any more (their
        caller's event loop is closed), for the front end to abort."""
        orphans = []
        for request_id, payload in outputs:
            with self.lock:
                route = self.routes.get(request_id)
                if route is None:
                    continue  # aborted by its caller while the step ran
                if isinstance(payload, BaseException) or payload.finished:
                    del self.routes[request_id]
                    self.num_finished += 1
                else:
                    route.prompt_left = 0
                    route.new_left = max(0, route.new_left - len(payload.new_token_ids))
            if not call_soon(route.loop, route.queue.put_nowait, (route.index, payload)):
                orphans.append(request_id)
        return orphans

    def fail_all(self, error: Exception, refusal: Exception) -> int:
        """The engine is gone: every request gets `error`, every waiting group `refusal`; returns
        how many requests failed."""
        with self.lock:
            routes, self.routes = self.routes, {}
            pending, self.pending = self.pending, {}
        for group in pending.values():
            call_soon(group.loop, settle, group.future, refusal)
        for route in routes.values():
            call_soon(route.loop, route.queue.put_nowait, (route.index, error))
        return len(routes)


def call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """fn(*args) on loop, from any thread; False when that loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def settle(future: asyncio.Future, error: BaseException | None) -> None:
    """Resolve an admission future, once (on its own loop)."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
