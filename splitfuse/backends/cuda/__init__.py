"""The cuda backend (Triton kernels). Importing it imports neither triton nor any CUDA API."""

from splitfuse.backends.cuda.backend import CudaBackend

__all__ = ["CudaBackend"]
