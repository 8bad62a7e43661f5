"""Registers the built-in backends through the same hook third-party plugins use."""

from splitfuse.plugins.hookspecs import hookimpl


@hookimpl
def splitfuse_register_backends(registry) -> None:
    # Imports stay inside the hook: listing backends must not import triton or touch a device.
    from splitfuse.backends.cpu import CpuBackend
    from splitfuse.backends.cuda import CudaBackend
    from splitfuse.backends.xpu import XpuBackend

    registry.add(CpuBackend)
    registry.add(CudaBackend)
    registry.add(XpuBackend)
