"""A typed facade over pluggy: loads built-in and installed plugins, fills the registries.

Built-ins register through the same hooks as third-party plugins, and first. A plugin that fails
to import, declares an API major version this splitfuse does not load, has a malformed hook, whose
hook raises, or that registers a name already taken is recorded in `failures`, logged by name, and
the rest keeps working; one declaring a deprecated version loads with a deprecation warning.
Environment: SPLITFUSE_PLUGINS (comma list) loads only those entry points;
SPLITFUSE_DISABLE_PLUGINS (comma list) skips those.
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import EntryPoint, entry_points

import pluggy

from splitfuse.plugins import hookspecs
from splitfuse.plugins.registry import (
    BUILTIN_SOURCE, BackendRegistry, ModelRegistry, PluginFailure, declared_version_problem,
)

ENTRY_POINT_GROUP = hookspecs.PROJECT
BUILTIN_PLUGINS = ("splitfuse.backends.builtin", "splitfuse.models.builtin")
VERSION_ATTRIBUTE = "SPLITFUSE_API_VERSION"  # a plugin module may declare the API it was written for
IN_PROCESS_SOURCE = "registered in code"

log = logging.getLogger("splitfuse")


def _env_names(var: str) -> set[str] | None:
    value = os.environ.get(var, "").strip()
    return {n.strip() for n in value.split(",") if n.strip()} if value else None


def _entry_point_source(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else ep.value


class PluginManager:
    def __init__(self, load_entry_points: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._load_failures: list[PluginFailure] = []
        self._sources: dict[str, str] = {}  # plugin name -> "built-in" or "dist-name version"
        self._declared: dict[str, object] = {}  # plugin name -> the SPLITFUSE_API_VERSION its module declares
        self._backends: BackendRegistry | None = None
        self._models: ModelRegistry | None = None
        for module_name in BUILTIN_PLUGINS:
            self._admit(importlib.import_module(module_name), module_name, BUILTIN_SOURCE)
        if load_entry_points:
            self._load_entry_points()

    def register(self, plugin: object, name: str | None = None, source: str = IN_PROCESS_SOURCE) -> None:
        """Register a plugin object (module or class with hookimpls) by hand, e.g. in tests."""
        self._admit(plugin, name or self._pm.get_canonical_name(plugin), source)
        self._backends = self._models = None

    def unregister(self, plugin: object) -> None:
        self._pm.unregister(plugin)
        self._backends = self._models = None

    def source(self, plugin_name: str) -> str:
        """Where a plugin came from: "built-in", a distribution's name and version, or how it was added."""
        return self._sources.get(plugin_name, "")

    @property
    def failures(self) -> list[PluginFailure]:
        """Plugins that did not load, then refused registrations of the registries built so far."""
        built = [r for r in (self._backends, self._models) if r is not None]
        return self._load_failures + [f for r in built for f in r.failures]

    def _fail(self, name: str, error: str, source: str, into: list[PluginFailure] | None = None) -> None:
        (self._load_failures if into is None else into).append(PluginFailure(name, error, source))
        log.warning("splitfuse plugin %r (%s): %s", name, source, error)

    def _admit(self, plugin: object, name: str, source: str) -> None:
        """Register a loaded plugin unless it declares another API version or its hooks are malformed."""
        declared = getattr(plugin, VERSION_ATTRIBUTE, None)
        if declared is not None:
            problem = declared_version_problem(declared, f"plugin {name!r}")
            if problem:
                return self._fail(name, f"not loaded: {problem}", source)
        try:
            self._pm.register(plugin, name=name)
            self._pm.check_pending()  # a misspelt hook name is an error, not a silently unused function
        except (pluggy.PluginValidationError, ValueError) as exc:  # ValueError: a module registered twice
            if self._pm.is_registered(plugin):
                self._pm.unregister(plugin)
            return self._fail(name, f"not loaded: {type(exc).__name__}: {exc}", source)
        self._sources[name] = source
        self._declared[name] = declared
        return None

    def _load_entry_points(self) -> None:
        allowed = _env_names("SPLITFUSE_PLUGINS")
        blocked = _env_names("SPLITFUSE_DISABLE_PLUGINS") or set()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or (allowed is not None and ep.name not in allowed):
                continue
            if self._pm.has_plugin(ep.name):
                continue  # the same distribution seen twice on sys.path
            source = _entry_point_source(ep)
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._fail(ep.name, f"failed to import {ep.value}: {type(exc).__name__}: {exc}", source)
                continue
            self._admit(plugin, ep.name, source)

    def _call_each(self, hook, registry) -> None:
        # Built-ins first, so that on a name clash the built-in keeps the name.
        impls = sorted(hook.get_hookimpls(), key=lambda impl: self.source(impl.plugin_name) != BUILTIN_SOURCE)
        for impl in impls:
            name, source = impl.plugin_name, self.source(impl.plugin_name)
            registry.registering(source, lambda error, n=name, s=source: self._fail(n, error, s, registry.failures),
                                 self._declared.get(name))
            try:
                impl.function(registry=registry)
            except Exception as exc:
                self._fail(name, f"{hook.name} raised {type(exc).__name__}: {exc}", source, registry.failures)
        registry.registering("", None)  # later add() calls outside a hook raise on a refusal

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
