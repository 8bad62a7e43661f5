"""A typed facade over pluggy: loads built-in and installed plugins, fills the registries.

Built-ins register through the same hooks as third-party plugins. A plugin that fails to import
or whose hook raises is recorded in `failures` and reported by name; the others keep working.
Environment: SPLITFUSE_PLUGINS (comma list) loads only those entry points;
SPLITFUSE_DISABLE_PLUGINS (comma list) skips those.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

import pluggy

from splitfuse.plugins import hookspecs
from splitfuse.plugins.registry import BackendRegistry, ModelRegistry, PluginFailure

ENTRY_POINT_GROUP = hookspecs.PROJECT
BUILTIN_PLUGINS = ("splitfuse.backends.builtin", "splitfuse.models.builtin")


def _env_names(var: str) -> set[str] | None:
    value = os.environ.get(var, "").strip()
    return {n.strip() for n in value.split(",") if n.strip()} if value else None


class PluginManager:
    def __init__(self, load_entry_points: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        for module_name in BUILTIN_PLUGINS:
            self._pm.register(importlib.import_module(module_name), name=module_name)
        if load_entry_points:
            self._load_entry_points()
        self._pm.check_pending()
        self._backends: BackendRegistry | None = None
        self._models: ModelRegistry | None = None

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object (module or class with hookimpls) by hand, e.g. in tests."""
        self._pm.register(plugin, name=name)
        self._pm.check_pending()
        self._backends = self._models = None

    def unregister(self, plugin: object) -> None:
        self._pm.unregister(plugin)
        self._backends = self._models = None

    def _load_entry_points(self) -> None:
        allowed = _env_names("SPLITFUSE_PLUGINS")
        blocked = _env_names("SPLITFUSE_DISABLE_PLUGINS") or set()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or (allowed is not None and ep.name not in allowed):
                continue
            if self._pm.has_plugin(ep.name):
                continue
            try:
                self._pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                self.failures.append(PluginFailure(ep.name, f"{type(exc).__name__}: {exc}"))

    def _call_each(self, hook, registry) -> None:
        for impl in hook.get_hookimpls():
            try:
                impl.function(registry=registry)
            except Exception as exc:
                self.failures.append(PluginFailure(impl.plugin_name, f"{type(exc).__name__}: {exc}"))

    def backends(self) -> BackendRegistry:
        if self._backends is None:
            self._backends = BackendRegistry()
            self._call_each(self._pm.hook.splitfuse_register_backends, self._backends)
        return self._backends

    def models(self) -> ModelRegistry:
        if self._models is None:
            self._models = ModelRegistry()
            self._call_each(self._pm.hook.splitfuse_register_models, self._models)
        return self._models


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, created on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins (after installing one, or between tests)."""
    global _manager
    _manager = None
