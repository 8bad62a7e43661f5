"""The hooks a splitfuse plugin implements (pluggy project and entry-point group `splitfuse`)."""

from __future__ import annotations

import pluggy

PROJECT = "splitfuse"
# The plugin API's major version: hooks, registries, the Backend contract and CausalLM. A plugin
# that declares another major version is refused at load time; one that declares none is loaded.
API_VERSION = 2
# Older major versions that still load, with a deprecation warning (version-1 backends through
# splitfuse.backends.v1_adapter; version-1 models unchanged, their contract is the same).
DEPRECATED_VERSIONS = (1,)
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def splitfuse_register_backends(registry) -> None:
    """Add backend classes with `registry.add(BackendClass)`."""


@hookspec
def splitfuse_register_models(registry) -> None:
    """Add model classes with `registry.add("LlamaForCausalLM", ModelClass)` (HF architecture name)."""
