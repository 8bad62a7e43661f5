"""Registries the hooks fill: backend classes by name, model classes by HF architecture name."""

from __future__ import annotations

from dataclasses import dataclass


class BackendRegistry:
    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def add(self, backend_cls: type) -> None:
        name = getattr(backend_cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"backend class {backend_cls!r} needs a non-empty `name` string")
        from splitfuse.backends.base import CONTRACT_VERSION

        version = getattr(backend_cls, "contract_version", CONTRACT_VERSION)
        if version != CONTRACT_VERSION:
            raise TypeError(
                f"backend {name!r} is written for backend contract version {version}, but this splitfuse "
                f"implements version {CONTRACT_VERSION}: upgrade the plugin or splitfuse"
            )
        self._classes[name] = backend_cls

    def names(self) -> list[str]:
        return sorted(self._classes, key=lambda n: -self._classes[n].priority)

    def get(self, name: str) -> type | None:
        return self._classes.get(name)

    def __iter__(self):
        return iter(self._classes[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._classes)


class ModelRegistry:
    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def add(self, architecture: str, model_cls: type) -> None:
        self._classes[architecture] = model_cls

    def get(self, architecture: str) -> type | None:
        return self._classes.get(architecture)

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, architecture: str) -> bool:
        return architecture in self._classes


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, kept so it can be reported by name."""

    name: str
    error: str
