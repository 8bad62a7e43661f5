"""A cpu backend that fails any forward pass holding a request marked for failure.

A request is marked when MARKER is its second prompt token (position 1); generated tokens and other
prompts never put MARKER there, so exactly the marked requests fail, wherever they are batched."""

from __future__ import annotations

import contextlib

from splitfuse.backends.cpu import CpuBackend
from splitfuse.plugins import hookimpl
from splitfuse.plugins.manager import get_plugin_manager

NAME = "faulty-cpu"
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


class _Plugin:
    @hookimpl
    def splitfuse_register_backends(self, registry):
        registry.add(FaultyCpuBackend)


@contextlib.contextmanager
def registered():
    """The faulty backend is selectable as NAME inside the block."""
    plugin = _Plugin()
    manager = get_plugin_manager()
    manager.register(plugin, name="reliability-faulty-backend")
    try:
        yield NAME
    finally:
        manager.unregister(plugin)
