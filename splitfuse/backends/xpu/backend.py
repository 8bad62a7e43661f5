"""The xpu backend: Intel GPUs through upstream PyTorch's torch.xpu.

Ops: the shared Triton kernels (splitfuse/backends/triton/; PyTorch's XPU builds ship Triton's
Intel backend), else the generic torch ops of `Backend`; attention in fp16/bf16 from
intel-extension-for-pytorch when that optional extra is installed (see ipex_attention.py).
`SPLITFUSE_XPU_KERNELS=torch|triton` overrides the automatic choice (kernels.py).

Test mode: with SPLITFUSE_XPU_ON_CPU=1 the backend is available on the CPU and runs the same op
selection on CPU tensors (the Triton kernels under TRITON_INTERPRET=1), so CI checks its numerics
without an Intel GPU. `auto` never picks it in that mode; ask for it by name (`--backend xpu`).
"""

from __future__ import annotations

import torch

from splitfuse.backends.device_backend import DeviceBackend
from splitfuse.backends.xpu import device as xpu_device
from splitfuse.backends.xpu import ipex_attention, kernels


class XpuBackend(DeviceBackend):
    name = "xpu"
    priority = 50  # between cuda (100) and cpu (0)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    device_kind = "xpu"
    memory_name = "XPU"
    cpu_mode_env = "SPLITFUSE_XPU_ON_CPU"

    # ---- discovery -------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str:
        return "" if cls.cpu_mode() else xpu_device.unavailable_reason()

    @classmethod
    def count_devices(cls) -> int:
        return xpu_device.device_count()

    @classmethod
    def distributed_backend(cls) -> str:
        # oneCCL's process groups, where this torch build has them; the CPU test mode runs gloo
        import torch.distributed as dist

        xccl = getattr(dist, "is_xccl_available", lambda: False)()
        return "xccl" if xccl and not cls.cpu_mode() else "gloo"

    def __init__(self, device_index: int = 0, device_module=None) -> None:
        super().__init__(device_index, device_module)
        self._ipex = ipex_attention.load()

    def choose_kernels(self) -> str:
        return kernels.choose(self.device.type)

    def memory_figures(self) -> tuple[int, int, str]:
        """mem_get_info where the driver supports it, else this process's use (see device.py)."""
        return xpu_device.memory_in_use(self.device, self.device_module)

    # ---- attention -------------------------------------------------------------------------
    def attention_impl(self, dtype: torch.dtype) -> str:
        """'ipex' for fp16/bf16 caches when intel-extension-for-pytorch is installed, else the kernels'."""
        if self._ipex is not None and dtype in ipex_attention.DTYPES:
            return "ipex"
        return super().attention_impl(dtype)

    def paged_attention(self, q, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):
        if self.attention_impl(kv_layer.dtype) == "ipex":
            return ipex_attention.paged_attention(self._ipex, q, kv_layer, meta, scale, sliding_window, logit_softcap)
        return super().paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)

    def describe_ops(self) -> str:
        return f"kernels: {self.kernels}" + (", attention: ipex (fp16/bf16)" if self._ipex is not None else "")


__all__ = ["XpuBackend"]
