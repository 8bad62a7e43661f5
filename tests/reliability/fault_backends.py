"""cpu backends for fault tests: one fails any forward pass holding a request marked for failure,
one is slow (so a request lasts long enough for a client to leave or a server to drain).

A request is marked when MARKER is its second prompt token (position 1); generated tokens and other
prompts never put MARKER there, so exactly the marked requests fail, wherever they are batched."""

from __future__ import annotations

import contextlib
import time

from splitfuse.backends.cpu import CpuBackend
from splitfuse.plugins import hookimpl
from splitfuse.plugins.manager import get_plugin_manager

NAME = "faulty-cpu"
SLOW = "slow-cpu"
SLOW_STEP_S = 0.02
MARKER = 7


class InjectedFault(RuntimeError):
    """The failure this backend injects."""


class FaultyCpuBackend(CpuBackend):
    name = NAME
    priority = -100  # never chosen by auto

    def forward(self, model, meta, kv_cache):
        marked = (meta.input_ids == MARKER) & (meta.positions == 1)
        if bool(marked.any()):
            raise InjectedFault("injected fault: a marked request is in this batch")
        return super().forward(model, meta, kv_cache)


class SlowCpuBackend(CpuBackend):
    name = SLOW
    priority = -100

    def forward(self, model, meta, kv_cache):
        time.sleep(SLOW_STEP_S)
        return super().forward(model, meta, kv_cache)


class _Plugin:
    @hookimpl
    def splitfuse_register_backends(self, registry):
        registry.add(FaultyCpuBackend)
        registry.add(SlowCpuBackend)


@contextlib.contextmanager
def registered():
    """The backends are selectable as NAME and SLOW inside the block."""
    plugin = _Plugin()
    manager = get_plugin_manager()
    manager.register(plugin, name="reliability-fault-backends")
    try:
        yield NAME
    finally:
        manager.unregister(plugin)
