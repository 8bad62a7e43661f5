"""Shutting down within a deadline: running requests finish if they can, the rest are answered 503."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import uvicorn

from splitfuse.serving.bridge import EngineFront

log = logging.getLogger("splitfuse.serving")

# What uvicorn waits beyond the drain deadline for the 503s and error events to be written.
_REPLY_GRACE_S = 5.0


def drain(engine: EngineFront, timeout: float) -> None:
    """Take no new requests; let running ones finish for up to `timeout` seconds, then abort the
    rest (a 503, or an error event then [DONE] in a stream)."""
    engine.close(drain=True, timeout=timeout)
    engine.close(drain=False, timeout=_REPLY_GRACE_S)  # nothing left to abort when the drain finished


class DrainingServer(uvicorn.Server):
    """uvicorn whose SIGINT/SIGTERM drains the engine within drain_timeout and then lets run() return
    normally (uvicorn would re-raise the signal, killing the process before the engine drains)."""

    def __init__(self, config: uvicorn.Config, engine: EngineFront, drain_timeout: float) -> None:
        config.timeout_graceful_shutdown = drain_timeout + _REPLY_GRACE_S
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._draining is None:
            log.warning("draining: running requests have %s s to finish", self.drain_timeout)
            self._draining = threading.Thread(target=drain, args=(self.engine, self.drain_timeout),
                                              name="splitfuse-drain", daemon=True)
            self._draining.start()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
