"""The cpu backend: paged attention, rotary (fused with the KV write), RMSNorm and the gated MLP
activations run as compiled kernels built at install time (see native_ops.py), every other op and any case those kernels do not
cover as the plain-torch reference ops; KV cache sized by `kv_cache_gib`; quantized weights through
native or torch's CPU weight-only kernels (see quantized.py). Without the kernels (no compiler at install
time, SPLITFUSE_NATIVE=0) every op is the reference op and describe() says why."""

from __future__ import annotations

import torch

from splitfuse.backends import torch_ops
from splitfuse.backends.base import Backend
from splitfuse.backends.cpu import dense_linear, native_ops
from splitfuse.backends.cpu.quantized import kernel_linear, prepare_weight
from splitfuse.quant.weights import QuantizedWeight


class CpuBackend(Backend):
    name = "cpu"
    priority = 0  # every other backend is preferred by `auto`
    dtypes = (torch.float32, torch.bfloat16)
    quantized_formats = ("int8", "int4")
    _dense_linear: str | None = None  # the bf16/fp16 linear path of the model run here (see warm_up)

    def __init__(self, device_index: int = 0) -> None:
        super().__init__(device_index)
        self._native = native_ops.load()
        self._activations = native_ops.load_activations()
        # as of now: describe() must not change when SPLITFUSE_NATIVE does afterwards
        self._kernels = "native kernels" if self._native is not None else self.kernels()
        # the fused kernel replaces rotary() + write_kv(): only while they are this class's own, so a
        # subclass that replaces either keeps it (Backend.rotary_write_kv composes them)
        cls = type(self)
        self._fuse_rotary_write = (self._native is not None and cls.write_kv is CpuBackend.write_kv
                                   and cls.rotary is CpuBackend.rotary)

    @classmethod
    def kernels(cls) -> str:
        """Which ops run here: "native kernels", or "plain torch: <why not the kernels>"."""
        reason = native_ops.unavailable_reason()
        return f"plain torch: {reason}" if reason else "native kernels"

    # ---- the compiled ops, each falling back to the reference where it does not apply ----------
    def paged_attention(self, q, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):
        out = None if self._native is None else self._native.paged_attention(
            q, kv_layer, meta, scale, sliding_window, logit_softcap)
        return super().paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap) if out is None else out

    def rotary_write_kv(self, q, k, v, positions, cos_sin, kv_layer, slot_mapping, rotary_dim=None,
                        interleaved=False):
        out = None if not self._fuse_rotary_write else self._native.rotary_write_kv(
            q, k, v, positions, cos_sin, kv_layer, slot_mapping, rotary_dim, interleaved)
        if out is None:
            return super().rotary_write_kv(q, k, v, positions, cos_sin, kv_layer, slot_mapping, rotary_dim,
                                           interleaved)
        return out

    def rotary(self, q, k, positions, cos_sin, rotary_dim=None, interleaved=False):
        out = None if self._native is None else self._native.rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
        return super().rotary(q, k, positions, cos_sin, rotary_dim, interleaved) if out is None else out

    def rms_norm(self, x, weight, eps, residual=None, weight_offset=0.0):
        out = None if self._native is None else self._native.rms_norm(x, weight, eps, residual, weight_offset)
        return super().rms_norm(x, weight, eps, residual, weight_offset) if out is None else out

    def silu_and_mul(self, x):
        out = None if self._activations is None else self._activations.gated_and_mul(x, "silu")
        return super().silu_and_mul(x) if out is None else out

    def gelu_and_mul(self, x, approximate="none"):
        out = None if self._activations is None or approximate not in ("none", "tanh") else (
            self._activations.gated_and_mul(x, "gelu" if approximate == "none" else "gelu_tanh"))
        return super().gelu_and_mul(x, approximate) if out is None else out

    def linear(self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, QuantizedWeight):
            out = kernel_linear(x, weight, bias)
            if out is not None:
                return out
            return torch_ops.linear(x, weight, bias)
        return dense_linear.linear(x, weight, bias)

    def prepare_linear_weight(self, weight: QuantizedWeight) -> QuantizedWeight:
        return prepare_weight(weight)

    @classmethod
    def linear_paths(cls) -> str:
        """How bfloat16 linears run here, for `splitfuse backends`."""
        return dense_linear.describe(torch.bfloat16)

    def warm_up(self, model, kv_cache, config, max_model_len: int, block_size: int) -> None:
        # describe() names the half-precision linear path of the model this backend runs
        if getattr(model, "dtype", None) in dense_linear.HALF_DTYPES:
            self._dense_linear = dense_linear.describe(model.dtype)
        super().warm_up(model, kv_cache, config, max_model_len, block_size)

    def describe(self) -> str:
        dense = "" if self._dense_linear is None else f", {self._dense_linear}"
        return f"cpu ({torch.get_num_threads()} threads, {self._kernels}{dense})"


__all__ = ["CpuBackend"]
