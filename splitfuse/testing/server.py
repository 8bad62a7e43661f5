"""Helpers for tests that drive a running splitfuse server."""

from __future__ import annotations

import time

import httpx


def wait_idle(url: str, timeout: float = 15.0) -> dict:
    """/health's stats once no request runs or waits and no KV block is held (aborts and frees
    are applied by the engine thread asynchronously); fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(url + "/health", timeout=5).json()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"server did not go idle within {timeout} s: {stats}")
        time.sleep(0.05)
