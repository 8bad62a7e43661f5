"""The cpu backend: the plain-torch reference ops, KV cache sized by `kv_cache_gib`."""

from __future__ import annotations

import torch

from splitfuse.backends.base import Backend


class CpuBackend(Backend):
    name = "cpu"
    priority = 0  # every other backend is preferred by `auto`
    dtypes = (torch.float32, torch.bfloat16)

    def describe(self) -> str:
        return f"cpu ({torch.get_num_threads()} threads)"


__all__ = ["CpuBackend"]
