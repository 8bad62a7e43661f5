"""Registries the hooks fill: backend classes by name, model classes by HF architecture name.

The first registration of a name wins (built-ins register first). A later class under the same
name, or a class written for an API major version this splitfuse does not load, is refused and
reported against the plugin that added it; that plugin's other registrations still go through.
A class written for a deprecated version is accepted with a deprecation warning (backends through
the version-1 adapter, see splitfuse.backends.v1_adapter).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from splitfuse.plugins.hookspecs import API_VERSION, DEPRECATED_VERSIONS

BUILTIN_SOURCE = "built-in"

log = logging.getLogger("splitfuse")


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, or a registration of it that was refused."""

    name: str  # the plugin: its entry-point name, or the name it was registered under
    error: str
    source: str = ""  # "built-in", or the distribution name and version it was installed from


def declared_major(declared: object) -> int | None:
    """The major version of `declared` (an int like 2, or a string like "2.1"); None if it is not one."""
    try:
        return int(str(declared).split(".")[0])
    except ValueError:
        return None


def is_deprecated_version(declared: object) -> bool:
    """Whether `declared` is a major version that still loads, with a deprecation warning."""
    return declared is not None and declared_major(declared) in DEPRECATED_VERSIONS


def declared_version_problem(declared: object, owner: str) -> str:
    """'' when `declared` is this API's major version or a deprecated one that still loads, else a
    message naming `owner` and saying what to do."""
    major = declared_major(declared)
    if major is None:
        return f"{owner} declares API version {declared!r}; expected an integer major version such as {API_VERSION}"
    if major == API_VERSION or major in DEPRECATED_VERSIONS:
        return ""
    return (f"{owner} is written for splitfuse plugin API version {major}, but this splitfuse implements "
            f"version {API_VERSION}: install a release of the plugin made for API version {API_VERSION}, "
            f"or a splitfuse that implements version {major}")


class _Registry:
    """Name -> class, with where each came from; refusals go to `report` (raised without one)."""

    kind = "class"

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self._classes: dict[str, type] = {}
        self._added: dict[str, type] = {}  # the class as the plugin added it (before any adapter)
        self._sources: dict[str, str] = {}
        self._report = report
        self._source = ""
        self._plugin_version: object = None
        self.failures: list[PluginFailure] = []  # refusals the plugin manager attributed to plugins

    def registering(self, source: str, report: Callable[[str], None] | None, plugin_version: object = None) -> None:
        """Attribute the following add() calls to one plugin: where it came from, where refusals go,
        and the API version its module declares (SPLITFUSE_API_VERSION; None when it declares none)."""
        self._source, self._report, self._plugin_version = source, report, plugin_version

    def _refuse(self, message: str) -> None:
        if self._report is None:
            raise ValueError(message)
        self._report(message)

    def _declared_version(self, cls: type) -> object:
        """The version the class declares, else its plugin module's (None: neither declares one)."""
        declared = getattr(cls, "api_version", None)
        return self._plugin_version if declared is None else declared

    def _deprecated(self, name: str, cls: type, major: int) -> tuple[type, str, str]:
        """For a class written for a deprecated major version: the class to store, the note its
        source gets, and the deprecation message."""
        where = f" ({self._source})" if self._source else ""
        return cls, "", (
            f"{self.kind} {name!r}{where} is written for splitfuse plugin API version {major}, which is deprecated: it "
            f"loads unchanged, since its contract is the same in version {API_VERSION}; declare version "
            f"{API_VERSION} (SPLITFUSE_API_VERSION = {API_VERSION} on the plugin module or api_version = "
            f"{API_VERSION} on the class)")

    def _accept(self, name: str, cls: type) -> None:
        owner = f"{self.kind} {name!r}"
        declared = self._declared_version(cls)
        if declared is not None:
            problem = declared_version_problem(declared, owner)
            if problem:
                return self._refuse(problem)
        if name in self._classes:
            if self._added[name] is not cls:
                self._refuse(f"{owner} is already registered by {self._sources[name] or 'another plugin'}; "
                             f"this one is ignored (rename it to use both)")
            return None
        stored, note = cls, ""
        if is_deprecated_version(declared):
            stored, note, message = self._deprecated(name, cls, declared_major(declared))
            warnings.warn(message, DeprecationWarning, stacklevel=3)  # points at the plugin's add() call
            log.warning("splitfuse: %s", message)
        self._classes[name], self._added[name] = stored, cls
        self._sources[name] = f"{self._source} ({note})".strip() if note else self._source
        return None

    def get(self, name: str) -> type | None:
        return self._classes.get(name)

    def source(self, name: str) -> str:
        """Where the class registered under `name` came from: "built-in" or "dist-name version"
        (followed by "(contract v1, adapted)" for a backend run through the version-1 adapter)."""
        return self._sources.get(name, "")

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __len__(self) -> int:
        return len(self._classes)


class BackendRegistry(_Registry):
    kind = "backend"

    def add(self, backend_cls: type) -> None:
        name = getattr(backend_cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"backend class {backend_cls!r} needs a non-empty `name` string")
        self._accept(name, backend_cls)

    def _declared_version(self, cls: type) -> object:
        # Backend itself carries the current contract_version, so only a version declared below it counts.
        from splitfuse.backends import v1_adapter

        declared = v1_adapter.declared_version(cls)
        return self._plugin_version if declared is None else declared

    def _deprecated(self, name: str, cls: type, major: int) -> tuple[type, str, str]:
        from splitfuse.backends import v1_adapter

        return (v1_adapter.adapt(cls), v1_adapter.ADAPTED_NOTE,
                v1_adapter.deprecation_message(name, cls, self._source))

    def names(self) -> list[str]:
        return sorted(self._classes, key=lambda n: -self._classes[n].priority)

    def __iter__(self):
        return iter(self._classes[n] for n in self.names())


class ModelRegistry(_Registry):
    kind = "model"

    def add(self, architecture: str, model_cls: type) -> None:
        if not isinstance(architecture, str) or not architecture:
            raise TypeError(f"model class {model_cls!r} needs a non-empty architecture name, got {architecture!r}")
        self._accept(architecture, model_cls)

    def names(self) -> list[str]:
        return sorted(self._classes)
