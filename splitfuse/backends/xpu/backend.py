"""The xpu backend: Intel GPUs through upstream PyTorch's torch.xpu.

Ops: the cuda backend's Triton kernels (device-agnostic; PyTorch's XPU builds ship Triton's Intel
backend), else the generic torch ops of `Backend`; attention in fp16/bf16 from
intel-extension-for-pytorch when that optional extra is installed (see ipex_attention.py).
`SPLITFUSE_XPU_KERNELS=torch|triton` overrides the automatic choice.

Test mode: with SPLITFUSE_XPU_ON_CPU=1 the backend is available on the CPU and runs the same op
selection on CPU tensors (the Triton kernels under TRITON_INTERPRET=1), so CI checks its numerics
without an Intel GPU. `auto` never picks it in that mode; ask for it by name (`--backend xpu`).
"""

from __future__ import annotations

import logging
import os

import torch

from splitfuse.backends import torch_ops
from splitfuse.backends.base import Backend
from splitfuse.backends.xpu import device as xpu_device
from splitfuse.backends.xpu import ipex_attention, kernels

log = logging.getLogger("splitfuse")

ON_CPU_ENV = "SPLITFUSE_XPU_ON_CPU"
_GIB = 1 << 30
# The same activation reserve as the cuda backend (its module explains the figures): the largest
# live activations of a step are under 32 bytes per token per hidden unit, plus 1 GiB for logits,
# sampler scratch, kernel workspaces and allocator fragmentation.
_RESERVE_BYTES_PER_HIDDEN = 32
_RESERVE_FIXED = 1 * _GIB


def _on_cpu() -> bool:
    """SPLITFUSE_XPU_ON_CPU set (read at call time) to anything but 0/false."""
    return os.environ.get(ON_CPU_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


class XpuBackend(Backend):
    name = "xpu"
    priority = 50  # between cuda (100) and cpu (0)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)

    # ---- discovery -------------------------------------------------------------------------
    @classmethod
    def on_cpu(cls) -> bool:
        """True in the test mode that runs the xpu op selection on CPU tensors."""
        return _on_cpu()

    @classmethod
    def unavailable_reason(cls) -> str:
        return "" if _on_cpu() else xpu_device.unavailable_reason()

    @classmethod
    def auto_selectable(cls) -> bool:
        return not _on_cpu()

    @classmethod
    def device_count(cls) -> int:
        return 1 if _on_cpu() else xpu_device.device_count()

    @classmethod
    def device_type(cls) -> str:
        return "cpu" if _on_cpu() else "xpu"

    def __init__(self, device_index: int = 0) -> None:
        super().__init__()
        if _on_cpu():
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("xpu", device_index)
            torch.xpu.set_device(self.device)
        self.kernels = kernels.choose(self.device.type)  # "triton" | "torch"
        self._k_act = self._k_norm = self._k_rot = self._k_attn = None
        if self.kernels == "triton":  # imported here: triton may be absent where this module loads
            from splitfuse.backends.triton import activation, paged_attention, rms_norm, rotary_kv

            self._k_act, self._k_norm, self._k_rot = activation, rms_norm, rotary_kv
            self._k_attn = paged_attention.paged_attention
        self._ipex = ipex_attention.load()

    # ---- memory ----------------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        if self.device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.xpu.is_bf16_supported() else torch.float16

    def kv_block_size(self, head_dim: int) -> int:
        return 32 if head_dim <= 64 else 16  # as the cuda backend: the Triton kernel's key tiles

    def num_kv_blocks(self, config, bytes_per_block: int, hidden_size: int) -> int:
        """gpu_memory_utilization of the device's total memory, less what is in use and an
        activation reserve (as the cuda backend); on the CPU test mode, kv_cache_gib."""
        if self.device.type == "cpu":
            return super().num_kv_blocks(config, bytes_per_block, hidden_size)
        torch.xpu.synchronize(self.device)
        torch.xpu.empty_cache()  # loading temporaries cached by torch are free for the KV cache
        total, used, source = xpu_device.memory_in_use(self.device)
        reserve = _RESERVE_FIXED + config.token_budget * hidden_size * _RESERVE_BYTES_PER_HIDDEN
        budget = int(total * config.gpu_memory_utilization) - used - reserve
        blocks = budget // bytes_per_block
        if blocks < 1:
            raise RuntimeError(
                f"no XPU memory left for the KV cache: {config.gpu_memory_utilization:.0%} of "
                f"{total / _GIB:.1f} GiB minus {used / _GIB:.2f} GiB in use ({source}) and a "
                f"{reserve / _GIB:.2f} GiB activation reserve leaves {budget / _GIB:.2f} GiB; raise "
                "gpu_memory_utilization, lower token_budget or set num_kv_blocks"
            )
        log.info("xpu KV cache: %d blocks (%.2f GiB) from %.1f GiB total, %.2f GiB in use (%s), "
                 "%.2f GiB activation reserve", blocks, blocks * bytes_per_block / _GIB, total / _GIB,
                 used / _GIB, source, reserve / _GIB)
        return int(blocks)

    def synchronize(self) -> None:
        if self.device.type == "xpu":
            torch.xpu.synchronize(self.device)

    # ---- model ops -------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps, residual=None, weight_offset=0.0):
        if self._k_norm is None:
            return super().rms_norm(x, weight, eps, residual, weight_offset)
        return self._k_norm.rms_norm(x, weight, eps, residual, weight_offset)

    def silu_and_mul(self, x):
        return super().silu_and_mul(x) if self._k_act is None else self._k_act.silu_and_mul(x)

    def gelu_and_mul(self, x, approximate="none"):
        if self._k_act is None:
            return super().gelu_and_mul(x, approximate)
        return self._k_act.gelu_and_mul(x, approximate)

    def rotary(self, q, k, positions, cos_sin, rotary_dim=None, interleaved=False):
        if self._k_rot is None:
            return super().rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
        return self._k_rot.rotary_and_cache(q, k, None, positions, cos_sin, None, None, rotary_dim, interleaved)

    def rotary_attention(self, q, k, v, positions, cos_sin, kv_layer, meta, scale, sliding_window=None,
                         logit_softcap=None, rotary_dim=None, interleaved=False):
        if self._k_rot is None:
            return super().rotary_attention(q, k, v, positions, cos_sin, kv_layer, meta, scale, sliding_window,
                                            logit_softcap, rotary_dim, interleaved)
        # one launch rotates q and k and stores rotated k and v into the cache
        q_rot, _ = self._k_rot.rotary_and_cache(q, k, v, positions, cos_sin, kv_layer, meta.slot_mapping,
                                                rotary_dim, interleaved, return_k=False)
        return self._paged_attention(q_rot, kv_layer, meta, scale, sliding_window, logit_softcap)

    def attention(self, q, k, v, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):
        if self._k_rot is None:
            torch_ops.write_kv(kv_layer, k, v, meta.slot_mapping)
        else:
            self._k_rot.write_kv(k, v, kv_layer, meta.slot_mapping)
        return self._paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)

    def attention_impl(self, dtype: torch.dtype) -> str:
        """Which paged attention runs for a cache dtype: 'ipex', 'triton' or 'torch'."""
        if self._ipex is not None and dtype in ipex_attention.DTYPES:
            return "ipex"
        return self.kernels

    def _paged_attention(self, q, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):
        impl = self.attention_impl(kv_layer.dtype)
        if impl == "ipex":
            return ipex_attention.paged_attention(self._ipex, q, kv_layer, meta, scale, sliding_window, logit_softcap)
        if impl == "triton":
            return self._k_attn(q, kv_layer, meta, scale, sliding_window, logit_softcap)
        return torch_ops.paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)

    def describe(self) -> str:
        ops = f"kernels: {self.kernels}" + (", attention: ipex (fp16/bf16)" if self._ipex is not None else "")
        if self.device.type == "cpu":
            return f"xpu (test mode on cpu; {ops})"
        props = torch.xpu.get_device_properties(self.device)
        return f"xpu ({props.name}, {props.total_memory / _GIB:.0f} GiB, device {self.device.index}; {ops})"


__all__ = ["XpuBackend"]
