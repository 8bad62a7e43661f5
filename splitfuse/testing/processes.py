"""Process checks for tests of worker processes: which have exited, which a process started."""

from __future__ import annotations

import os
import time


def is_gone(pid: int) -> bool:
    """True once pid has exited (a zombie not yet reaped by its new parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still running after waiting up to timeout seconds for them to exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(is_gone(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if not is_gone(pid)]


def spawned_children(pid: int) -> list[int]:
    """The pids of the processes pid started with multiprocessing's spawn (not its resource tracker);
    Linux's /proc lists children per thread."""
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return [p for p in pids if b"spawn_main" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""
