"""The engine process of one replica: builds its Engine, then runs the shared EngineLoop on a pipe.

Runs under multiprocessing's "spawn" context, so everything here must be importable and every
message picklable. Protocol (in pipe order):
  front end -> replica: the loop's commands as they are (AddGroup, Abort, Close)
  replica -> front end: ("ready", info) or ("failed", message) once; then ("admitted", group_id, error|None),
                        ("outputs", [(request_id, RequestOutput | Exception)], EngineStats), ("stats", EngineStats)
"""

from __future__ import annotations

import logging
import os

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
