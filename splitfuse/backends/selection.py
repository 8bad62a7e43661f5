"""Pick a backend by name (`--backend`, SPLITFUSE_BACKEND) or the best available one (`auto`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from splitfuse.plugins.manager import get_plugin_manager


class BackendError(RuntimeError):
    """The requested backend is unknown or cannot run here."""


@dataclass
class BackendInfo:
    name: str
    priority: int
    available: bool
    reason: str  # why it is unavailable, or why the plugin failed to load
    auto_selectable: bool = True  # False: runs when named, but `auto` passes it over


def list_backends() -> list[BackendInfo]:
    """Every registered backend with its state, plus plugins that failed to load."""
    manager = get_plugin_manager()
    infos = []
    for cls in manager.backends():
        try:
            reason = cls.unavailable_reason()
        except Exception as exc:  # a backend whose probe crashes is reported, not fatal
            reason = f"availability check failed: {type(exc).__name__}: {exc}"
        infos.append(BackendInfo(cls.name, cls.priority, reason == "", reason, cls.auto_selectable()))
    for failure in manager.failures:
        infos.append(BackendInfo(failure.name, -1, False, f"plugin failed to load: {failure.error}"))
    return infos


def _listing(infos: list[BackendInfo]) -> str:
    lines = [f"  {i.name}: {'available' if i.available else 'unavailable (' + i.reason + ')'}" for i in infos]
    return "registered backends:\n" + "\n".join(lines)


def backend_class(name: str | None = None) -> type:
    """The class of the named backend; None reads SPLITFUSE_BACKEND, then falls back to auto."""
    name = (name or os.environ.get("SPLITFUSE_BACKEND") or "auto").strip()
    infos = list_backends()
    registry = get_plugin_manager().backends()
    if name == "auto":
        for info in infos:
            if info.available and info.auto_selectable:
                return registry.get(info.name)
        raise BackendError("no backend is available\n" + _listing(infos))
    cls = registry.get(name)
    if cls is None:
        raise BackendError(f"unknown backend {name!r}\n" + _listing(infos))
    info = next(i for i in infos if i.name == name)
    if not info.available:
        raise BackendError(f"backend {name!r} is unavailable: {info.reason}\n" + _listing(infos))
    return cls


def create_backend(name: str | None = None, device_index: int = 0):
    """An instance of the named backend (see backend_class) on its device_index-th device."""
    cls = backend_class(name)
    count = cls.device_count()
    if not 0 <= device_index < max(count, 1):
        raise BackendError(f"backend {cls.name!r} has {count} device(s); device_index {device_index} is out of range")
    # Index 0 is the default, so plugin backends whose __init__ takes no argument keep working.
    return cls(device_index=device_index) if device_index else cls()
