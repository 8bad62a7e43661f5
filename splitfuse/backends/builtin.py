"""Registers the built-in backends through the same hook third-party plugins use."""

from splitfuse.plugins.hookspecs import hookimpl


@hookimpl
def splitfuse_register_backends(registry) -> None:
    from splitfuse.backends.cpu import CpuBackend

    registry.add(CpuBackend)
