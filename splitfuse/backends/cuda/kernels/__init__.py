"""Triton kernels of the CUDA backend (each module imports triton; import them only where triton is available)."""
