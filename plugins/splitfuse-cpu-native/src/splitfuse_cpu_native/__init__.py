"""splitfuse-cpu-native: the cpu backend with compiled C++ ops (paged attention, fused norm, rotary)."""

from splitfuse_cpu_native.backend import CpuNativeBackend

__all__ = ["CpuNativeBackend"]
