"""The xpu backend (Intel GPUs through upstream PyTorch's torch.xpu). Importing it touches no device."""

from splitfuse.backends.xpu.backend import XpuBackend

__all__ = ["XpuBackend"]
