"""Registries the hooks fill: backend classes by name, model classes by HF architecture name.

The first registration of a name wins (built-ins register first). A later class under the same
name, or a class written for another API major version, is refused and reported against the
plugin that added it; that plugin's other registrations still go through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from splitfuse.plugins.hookspecs import API_VERSION

BUILTIN_SOURCE = "built-in"


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, or a registration of it that was refused."""

    name: str  # the plugin: its entry-point name, or the name it was registered under
    error: str
    source: str = ""  # "built-in", or the distribution name and version it was installed from


def declared_version_problem(declared: object, owner: str) -> str:
    """'' when `declared` (an int like 1, or a string like "1.2") is this API's major version,
    else a message naming `owner` and saying what to do."""
    try:
        major = int(str(declared).split(".")[0])
    except ValueError:
        return f"{owner} declares API version {declared!r}; expected an integer major version such as {API_VERSION}"
    if major in (API_VERSION, 1):  # version 1: still loaded (temporary, until the v1 adapter lands)
        return ""
    return (f"{owner} is written for splitfuse plugin API version {major}, but this splitfuse implements "
            f"version {API_VERSION}: install a release of the plugin made for API version {API_VERSION}, "
            f"or a splitfuse that implements version {major}")


class _Registry:
    """Name -> class, with where each came from; refusals go to `report` (raised without one)."""

    kind = "class"

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self._classes: dict[str, type] = {}
        self._sources: dict[str, str] = {}
        self._report = report
        self._source = ""
        self.failures: list[PluginFailure] = []  # refusals the plugin manager attributed to plugins

    def registering(self, source: str, report: Callable[[str], None] | None) -> None:
        """Attribute the following add() calls to one plugin: where it came from, where refusals go."""
        self._source, self._report = source, report

    def _refuse(self, message: str) -> None:
        if self._report is None:
            raise ValueError(message)
        self._report(message)

    def _accept(self, name: str, cls: type, version_attrs: tuple[str, ...]) -> None:
        owner = f"{self.kind} {name!r}"
        for attr in version_attrs:
            declared = getattr(cls, attr, None)
            if declared is not None:
                problem = declared_version_problem(declared, owner)
                if problem:
                    return self._refuse(problem)
                break
        if name in self._classes:
            if self._classes[name] is not cls:
                self._refuse(f"{owner} is already registered by {self._sources[name] or 'another plugin'}; "
                             f"this one is ignored (rename it to use both)")
            return None
        self._classes[name] = cls
        self._sources[name] = self._source
        return None

    def get(self, name: str) -> type | None:
        return self._classes.get(name)

    def source(self, name: str) -> str:
        """Where the class registered under `name` came from: "built-in" or "dist-name version"."""
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
        # `contract_version` is what Backend classes have always carried; `api_version` is the same
        # number under the name every plugin class may use.
        self._accept(name, backend_cls, ("api_version", "contract_version"))

    def names(self) -> list[str]:
        return sorted(self._classes, key=lambda n: -self._classes[n].priority)

    def __iter__(self):
        return iter(self._classes[n] for n in self.names())


class ModelRegistry(_Registry):
    kind = "model"

    def add(self, architecture: str, model_cls: type) -> None:
        if not isinstance(architecture, str) or not architecture:
            raise TypeError(f"model class {model_cls!r} needs a non-empty architecture name, got {architecture!r}")
        self._accept(architecture, model_cls, ("api_version",))

    def names(self) -> list[str]:
        return sorted(self._classes)
