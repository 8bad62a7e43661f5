"""cpu-native: the built-in cpu backend with the hot ops replaced by compiled C++ (see csrc/ops.cpp).

Overridden: the attention building blocks `paged_attention` (reads K/V straight from the cache
blocks: no gather copy, no per-step index planning) and `rotary_write_kv` (rotary fused with the
KV-cache write), from which `Backend` composes `attention` and `rotary_attention`; the rotary on
its own; and RMSNorm fused with the residual add. Every other op, and any case a C++ op does not
cover (dtypes other than float32 for the norm and the rotary, a non-contiguous cache), is the
reference op of `CpuBackend`.
"""

from __future__ import annotations

import torch

from splitfuse.backends.cpu import CpuBackend
from splitfuse_cpu_native import build

_ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CpuNativeBackend(CpuBackend):
    name = "cpu-native"
    # below cpu: it needs a C++ compiler and a first-use build, so `auto` keeps the always-available
    # cpu backend and this one runs when named (--backend cpu-native)
    priority = -5

    @classmethod
    def unavailable_reason(cls) -> str:
        return build.unavailable_reason()

    def __init__(self, device_index: int = 0) -> None:
        super().__init__(device_index)
        self._ops = build.ops()  # compiled on first use, then loaded from torch's extension cache

    def paged_attention(self, q, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):
        if q.dtype != kv_layer.dtype or q.dtype not in _ATTENTION_DTYPES or not kv_layer.is_contiguous():
            return super().paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)
        if q.stride(-1) != 1:
            q = q.contiguous()
        return self._ops.paged_attention(q, kv_layer, meta.query_start, meta.context_lens, meta.block_tables,
                                         float(scale), int(sliding_window or 0), float(logit_softcap or 0.0))

    def rotary_write_kv(self, q, k, v, positions, cos_sin, kv_layer, slot_mapping, rotary_dim=None,
                        interleaved=False):
        if not (_rotary_fits(q, k, positions, cos_sin) and v.dtype == torch.float32 and v.stride(-1) == 1
                and kv_layer.dtype == torch.float32 and kv_layer.is_contiguous()):
            return super().rotary_write_kv(q, k, v, positions, cos_sin, kv_layer, slot_mapping, rotary_dim,
                                           interleaved)
        return self._ops.rotary_write_kv(q, k, v, positions, cos_sin, kv_layer, slot_mapping,
                                         rotary_dim or cos_sin.shape[-1], interleaved)

    def rotary(self, q, k, positions, cos_sin, rotary_dim=None, interleaved=False):
        if not _rotary_fits(q, k, positions, cos_sin):
            return super().rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
        return self._ops.rotary(q, k, positions, cos_sin, rotary_dim or cos_sin.shape[-1], interleaved)

    def rms_norm(self, x, weight, eps, residual=None, weight_offset=0.0):
        if (residual is None or weight_offset or x.dtype != torch.float32 or residual.dtype != torch.float32
                or weight.dtype != torch.float32 or not (x.is_contiguous() and residual.is_contiguous())):
            return super().rms_norm(x, weight, eps, residual, weight_offset)
        return self._ops.rms_norm_residual(x, residual, weight, eps)

    def describe(self) -> str:
        return f"cpu-native ({torch.get_num_threads()} threads, compiled C++ ops)"


def _rotary_fits(q, k, positions, cos_sin) -> bool:
    """Whether the C++ rotary covers these tensors (float32, unit last stride, contiguous table and
    int64 positions)."""
    return (q.dtype == k.dtype == cos_sin.dtype == torch.float32 and q.stride(-1) == 1 and k.stride(-1) == 1
            and cos_sin.is_contiguous() and positions.dtype == torch.int64 and positions.is_contiguous())
