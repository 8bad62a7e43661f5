"""The engine loop both front ends run: apply commands between steps, step, report to a sink.

AsyncEngine runs it in a thread fed from a condition variable (bridge.py); a replica process runs it
fed from a pipe (replica_worker.py). Commands are small picklable dataclasses, so they cross the
pipe as they are. The loop keeps these promises for both:
- a group of requests is admitted all or none (the sink hears `admitted(group_id, error)`);
- a group that would leave more than `max_waiting` requests the scheduler cannot admit now is
  turned away with QueueFull; one larger than the engine could ever queue, with GroupTooLarge;
- after Close the loop takes no new group (EngineStopped); with drain it finishes what it holds,
  without drain it aborts it (each request gets EngineClosed), then it returns;
- a failed step fails only the requests that were in it (EngineError); the loop goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from splitfuse.config import SamplingParams
from splitfuse.core.engine import Engine, EngineStats, StepError
from splitfuse.core.request import RequestOutput
from splitfuse.serving.errors import EngineClosed, EngineError, EngineStopped
from splitfuse.serving.limits import backlog, refusal

log = logging.getLogger("splitfuse.serving")


@dataclass(frozen=True)
class AddGroup:
    """Admit these (prompt_ids, params, request_id) all or none."""

    group_id: int
    requests: list[tuple[list[int], SamplingParams, str]]


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Close:
    """Take no new requests; drain: finish those held, else abort them."""

    drain: bool = True


Command = AddGroup | Abort | Close
Outputs = list[tuple[str, RequestOutput | Exception]]


class CommandSource(Protocol):
    def take(self, block: bool) -> list[Command]:
        """The commands that have arrived; with block, wait until there is at least one."""

    def close(self) -> list[Command]:
        """Take no more commands; returns those that arrived and were not taken yet."""


class Sink(Protocol):
    """Where the loop reports; called from the loop's thread."""

    def admitted(self, group_id: int, error: Exception | None) -> None: ...

    def outputs(self, outputs: Outputs, stats: EngineStats) -> None:
        """Outputs of one step (or the requests a Close aborted), with the stats after it."""

    def publish(self, stats: EngineStats) -> None:
        """Stats after commands were applied."""


class EngineLoop:
    """One engine, stepped while it has work, fed by a CommandSource, reporting to a Sink."""

    def __init__(self, engine: Engine, source: CommandSource, sink: Sink, max_waiting: int = 1024) -> None:
        self.engine, self.source, self.sink = engine, source, sink
        self.max_waiting = max_waiting  # read at each admission, so a front end may change it
        self.stopping = False

    def run(self) -> None:
        """Until closed and idle: apply what has arrived (waiting for it when idle), then step."""
        self.sink.publish(self.engine.stats())
        while True:
            idle = not self.engine.has_unfinished()
            commands = self.source.take(block=idle and not self.stopping)
            for command in commands:
                self.apply(command)
            if commands:
                self.sink.publish(self.engine.stats())
            if self.stopping and not self.engine.has_unfinished():
                for command in self.source.close():  # arrived meanwhile: answered, never dropped
                    self.apply(command)
                return
            if self.engine.has_unfinished():
                self.step()

    def apply(self, command: Command) -> None:
        if isinstance(command, Abort):
            self.engine.abort(command.request_id)
        elif isinstance(command, Close):
            self.stopping = True
            if not command.drain:
                aborted = self.engine.abort_all()
                if aborted:
                    error = EngineClosed("the engine was closed before this request finished; retry")
                    self.sink.outputs([(rid, error) for rid in aborted], self.engine.stats())
        elif isinstance(command, AddGroup):
            self.sink.admitted(command.group_id, self.admit(command.requests))
        else:
            raise TypeError(f"unknown engine loop command {command!r}; expected AddGroup, Abort or Close")

    def admit(self, requests: list[tuple[list[int], SamplingParams, str]]) -> Exception | None:
        """Queue the group all or none; the error (if any) goes back to the waiting caller."""
        if self.stopping:
            return EngineStopped("the engine is shutting down")
        waiting = backlog(self.engine, [ids for ids, _, _ in requests])
        error = refusal(len(requests), self.engine.scheduler.max_seqs, waiting, self.max_waiting)
        if error is not None:
            return error
        try:
            self.engine.add_requests(requests)
        except Exception as exc:  # noqa: BLE001 - an admission error belongs to its caller, not this loop
            return exc
        return None

    def step(self) -> None:
        try:
            outputs: Outputs = [(out.request_id, out) for out in self.engine.step()]
        except StepError as exc:  # the engine has aborted the requests it failed on; the others went on
            log.exception("engine step failed")
            if self.engine.parallel is not None:
                # its ranks are out of step (or one died): it cannot step again, so the loop stops
                # and its front end fails over (a replica exits; a lone engine turns unavailable)
                raise
            error = EngineError(f"the engine failed on this request: {exc}")
            outputs = [(out.request_id, out) for out in exc.outputs] + [(rid, error) for rid in exc.request_ids]
        self.sink.outputs(outputs, self.engine.stats())
