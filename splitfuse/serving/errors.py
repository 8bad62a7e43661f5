"""What a front end raises to its callers; the app maps each to an HTTP status."""

from __future__ import annotations


class QueueFull(RuntimeError):
    """Too many requests are waiting; the client should retry later (HTTP 429)."""


class GroupTooLarge(ValueError):
    """A request with more completions (prompts x n) than the engine could ever queue (HTTP 400)."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


class EngineError(RuntimeError):
    """A step failed while this request was in it; the request was aborted (HTTP 500)."""


class ReplicaLost(EngineError):
    """The replica process serving this request exited; other replicas still serve (HTTP 503)."""


class EngineClosed(EngineError):
    """The engine was closed without draining while this request ran; it was aborted (HTTP 503)."""
