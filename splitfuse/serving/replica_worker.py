"""The engine process of one replica: builds its Engine, then steps it for commands from a pipe.

Runs under multiprocessing's "spawn" context, so everything here must be importable and every
message picklable. Protocol (tuples, in pipe order):
  front end -> replica: ("add", group_id, [(prompt_ids, params, request_id)]), ("abort", request_id),
                        ("close", drain)
  replica -> front end: ("ready", info) or ("failed", message) once; then ("admitted", group_id, error|None),
                        ("outputs", [(request_id, RequestOutput | Exception)], Stats), ("stats", Stats)
"""

from __future__ import annotations

import logging
import os

from splitfuse.serving.bridge import EngineStopped, QueueFull, Stats, engine_stats, step_engine

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
        from splitfuse.pipeline import build_engine

        engine = build_engine(model, backend, config, device_index)
    except Exception as exc:  # the front end reports it; a traceback here helps the operator
        log.exception("replica failed to start")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    # The tokenizer travels to the front end, which encodes and decodes for every replica.
    conn.send(("ready", {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len,
                         "sampling_defaults": dict(engine.sampling_defaults), "pid": os.getpid()}))
    try:
        _Loop(engine, conn, max_waiting).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front end went away: nobody is left to serve


class _Loop:
    """AsyncEngine's loop, fed from a pipe instead of a condition variable."""

    def __init__(self, engine, conn, max_waiting: int) -> None:
        self.engine, self.conn, self.max_waiting = engine, conn, max_waiting
        self.stopping = False
        self.steps = 0

    def run(self) -> None:
        self.conn.send(("stats", self.stats()))
        while True:
            # Block while idle; between steps only take what has already arrived.
            timeout = 0 if self.engine.has_unfinished() else None
            applied = False
            while (not self.stopping or self.engine.has_unfinished()) and self.conn.poll(timeout):
                self.apply(self.conn.recv())
                applied, timeout = True, 0
            if applied:
                self.conn.send(("stats", self.stats()))
            if self.stopping and not self.engine.has_unfinished():
                return
            if self.engine.has_unfinished():
                self.step()

    def apply(self, command) -> None:
        kind = command[0]
        if kind == "abort":
            self.engine.abort(command[1])
        elif kind == "close":
            self.stopping = True
            if not command[1]:  # no drain: abort everything still running or waiting
                for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
                    self.engine.abort(seq.request_id)
        else:
            self.conn.send(("admitted", command[1], self.add(command[2])))

    def add(self, requests) -> Exception | None:
        """Admit all requests or none; the error (if any) goes back to the waiting caller."""
        if self.stopping:
            return EngineStopped("the replica is shutting down")
        waiting = len(self.engine.scheduler.waiting)
        if waiting + len(requests) > self.max_waiting:
            return QueueFull(f"{waiting} requests are waiting (max_waiting={self.max_waiting}); retry later")
        added = []
        try:
            for ids, params, rid in requests:
                self.engine.add_request(ids, params, rid)
                added.append(rid)
        except Exception as exc:  # noqa: BLE001 - any admission error belongs to the caller, not this loop
            for rid in added:
                self.engine.abort(rid)
            return exc
        return None

    def step(self) -> None:
        self.steps += 1
        outputs = step_engine(self.engine)
        # Stats ride with the outputs, so the front end never sees outputs newer than its stats.
        self.conn.send(("outputs", outputs, self.stats()))

    def stats(self) -> Stats:
        return engine_stats(self.engine, self.steps)
