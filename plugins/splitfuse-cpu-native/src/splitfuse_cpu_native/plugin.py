"""The entry point splitfuse loads (group `splitfuse`): registers the cpu-native backend."""

from splitfuse.plugins import hookimpl

SPLITFUSE_API_VERSION = 2  # the plugin API this package was written for


@hookimpl
def splitfuse_register_backends(registry) -> None:
    from splitfuse_cpu_native.backend import CpuNativeBackend

    registry.add(CpuNativeBackend)
