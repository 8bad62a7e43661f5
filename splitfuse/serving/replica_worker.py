"""The engine process of one replica: builds its Engine, then runs the shared EngineLoop on a pipe;
and ProcessEngine, the front end's handle on such a process.

Runs under multiprocessing's "spawn" context, so everything here must be importable and every
message picklable. Protocol (in pipe order):
  front end -> replica: the loop's commands as they are (AddGroup, Abort, Close)
  replica -> front end: ("ready", info) or ("failed", message) once; then ("admitted", group_id, error|None),
                        ("outputs", [(request_id, RequestOutput | Exception)], EngineStats), ("stats", EngineStats)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Iterator

from splitfuse.core.engine import EngineStats
from splitfuse.serving.loop import Command, EngineLoop, Outputs

log = logging.getLogger("splitfuse.serving")


def replica_main(conn, model, backend, config, max_waiting: int, num_threads: int | None,
                 device_index: int = 0) -> None:
    """Entry point of the child process; returns (and so exits) once closed or the pipe breaks."""
    # Out of the server's process group: Ctrl-C or a SIGTERM sent to the group must reach only the
    # front end, which drains and then closes the replicas; were they signalled too, they would die
    # with requests in flight.
    os.setsid()
    if num_threads:
        import torch

        # Replicas on one CPU would otherwise each start a thread per core and fight over them.
        torch.set_num_threads(num_threads)
    try:
        from splitfuse.assembly import build_engine

        engine = build_engine(model, backend, config, device_index)
    except Exception as exc:  # the front end reports it; a traceback here helps the operator
        log.exception("replica failed to start")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    # The tokenizer travels to the front end, which encodes and decodes for every replica.
    conn.send(("ready", {"tokenizer": engine.tokenizer, "settings": engine.settings,
                         "max_model_len": engine.max_model_len,
                         "sampling_defaults": dict(engine.sampling_defaults), "pid": os.getpid()}))
    pipe = PipeEnds(conn)
    try:
        EngineLoop(engine, pipe, pipe, max_waiting).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front end went away: nobody is left to serve


class PipeEnds:
    """The loop's command source and sink over the replica's end of the pipe."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def take(self, block: bool) -> list[Command]:
        # Block while idle; between steps only take what has already arrived.
        commands = []
        timeout = None if block else 0
        while self.conn.poll(timeout):
            commands.append(self.conn.recv())
            timeout = 0
        return commands

    def close(self) -> list[Command]:
        return self.take(block=False)

    def admitted(self, group_id: int, error: Exception | None) -> None:
        self.conn.send(("admitted", group_id, error))

    def outputs(self, outputs: Outputs, stats: EngineStats) -> None:
        # Stats ride with the outputs, so the front end never sees outputs newer than its stats.
        self.conn.send(("outputs", outputs, stats))

    def publish(self, stats: EngineStats) -> None:
        self.conn.send(("stats", stats))


class ProcessEngine:
    """The front end's handle on one replica process: launch (again after a death), feed, read."""

    def __init__(self, index: int, args: tuple) -> None:
        self.index, self.args = index, args  # replica_main's arguments after the pipe
        self.process = None
        self.conn = None
        self._send_lock = threading.Lock()  # the event loop and reader threads all send

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def launch(self) -> None:
        """Start a fresh process; wait_ready() then waits for its engine."""
        ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and torch state
        parent, child = ctx.Pipe()
        config = self.args[2]
        # a daemonic process may not start children, and a tensor-parallel replica starts its worker
        # ranks; a replica exits on its own once its pipe closes, daemonic or not
        self.process = ctx.Process(target=replica_main, name=f"splitfuse-replica-{self.index}",
                                   daemon=config.tensor_parallel_size == 1, args=(child, *self.args))
        self.process.start()
        child.close()  # only the child holds its end, so its death reads as EOF here
        self.conn = parent

    def wait_ready(self, timeout: float) -> dict:
        """The engine's info once built; RuntimeError when it fails, exits or takes too long."""
        if not self.conn.poll(timeout):
            raise RuntimeError(f"replica {self.index} did not start within {timeout} s")
        try:
            kind, info = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"replica {self.index} exited while starting "
                               f"(code {self.process.exitcode})") from None
        if kind != "ready":
            raise RuntimeError(f"replica {self.index} failed to start: {info}")
        return info

    def send(self, command: Command) -> bool:
        """False when the process is gone (its reader then sees the end of the pipe)."""
        try:
            with self._send_lock:
                self.conn.send(command)
            return True
        except (OSError, ValueError):
            return False

    def receive(self) -> Iterator[tuple]:
        """The process's messages until it exits (or is killed): its end of the pipe then closes."""
        while True:
            try:
                yield self.conn.recv()
            except (EOFError, OSError):
                return

    def exit_reason(self) -> str:
        self.process.join(5)
        return f"exit code {self.process.exitcode}"

    def join(self, timeout: float | None) -> None:
        """Wait for the process to exit (after Close); kill it when it takes longer than timeout."""
        if self.process is None:
            return
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("replica %d did not stop in %s s; killing it", self.index, timeout)
            self.process.kill()
            self.process.join(5)
        self.conn.close()
