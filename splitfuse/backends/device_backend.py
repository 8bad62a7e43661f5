"""What the accelerator backends (cuda, xpu) share: a Backend on one device of a torch device
module (torch.cuda, torch.xpu), running the Triton kernels of splitfuse/backends/triton/ where
Triton can compile for it and the torch ops of Backend otherwise.

It owns KV-cache sizing from device memory, dtype and block-size defaults, pinned host-to-device
copies, decode-step graph capture, the CPU test mode (an environment flag that puts the backend
on CPU tensors, for tests without the device) and the wiring of the attention building blocks.
A subclass names its device and flag and answers a few hooks: how many devices there are, which
kernels it runs, memory figures, which paged attention runs for a cache dtype.

Importing this module imports neither triton nor a kernel, and touches no device API.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import types
from typing import ClassVar

import torch

from splitfuse.backends import fp8_linear
from splitfuse.backends.base import Backend
from splitfuse.core.batch import BatchMeta
from splitfuse.quant.weights import QuantizedWeight

log = logging.getLogger("splitfuse")

GIB = 1 << 30

# Activation reserve kept out of the KV cache on the device. A step holds at most token_budget
# tokens; its largest live activations per token are the fused gate/up projection (2 x
# intermediate, about 7 x hidden), the qkv projection, the residual stream and a few hidden-size
# temporaries: under 16 x hidden elements, 32 x hidden bytes in bf16:
#   token_budget x hidden_size x 32 B  (768 tokens of an 8B model, hidden 4096 -> 96 MiB)
# The fixed part covers the logits and sampler scratch (max_seqs rows of a ~128K vocabulary in
# float32, plus sort buffers for top-p), Triton/BLAS workspaces and allocator fragmentation.
RESERVE_BYTES_PER_HIDDEN = 32
RESERVE_FIXED = 1 * GIB

# Decode batches up to this size replay captured graphs; capture stops after the time limit
# (start-up must stay short), and larger batches, which are device-bound anyway, run eagerly.
MAX_GRAPH_BATCH = 256
GRAPH_CAPTURE_LIMIT_S = 30.0


def env_flag(name: str) -> bool:
    """Whether environment variable `name` is set to anything but empty/0/false/no/off (read at
    call time, so tests and launchers may set it late)."""
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def activation_reserve(token_budget: int, hidden_size: int) -> int:
    """Bytes kept free for one step's activations, logits and workspaces (see RESERVE_*)."""
    return RESERVE_FIXED + token_budget * hidden_size * RESERVE_BYTES_PER_HIDDEN


@functools.cache
def triton_ops() -> types.SimpleNamespace:
    """The Triton op modules, imported on first use: triton may be absent where this module loads,
    and it reads TRITON_INTERPRET when the kernels are defined."""
    from splitfuse.backends.triton import activation, layer_norm, moe, paged_attention, quant_linear, rms_norm, rotary_kv

    return types.SimpleNamespace(activation=activation, layer_norm=layer_norm, moe=moe,
                                 paged_attention=paged_attention, quant_linear=quant_linear, rms_norm=rms_norm,
                                 rotary_kv=rotary_kv)


class DeviceBackend(Backend):
    """A Backend on torch.<device_kind>; subclasses set the class attributes below and the hooks."""

    device_kind: ClassVar[str] = ""  # torch device type and module name: "cuda", "xpu"
    memory_name: ClassVar[str] = ""  # how errors name the device's memory: "GPU", "XPU"
    cpu_mode_env: ClassVar[str] = ""  # the environment flag of the CPU test mode
    cpu_mode_label: ClassVar[str] = "test mode on cpu"  # describe() in that mode
    quantized_formats: ClassVar[tuple[str, ...]] = ("int8", "int4")  # the Triton kernels (fp8: see fp8_linear)

    # ---- discovery -------------------------------------------------------------------------
    @classmethod
    def cpu_mode(cls) -> bool:
        """True in the test mode that runs this backend's op selection on CPU tensors."""
        return env_flag(cls.cpu_mode_env)

    @classmethod
    def auto_selectable(cls) -> bool:
        return not cls.cpu_mode()  # the CPU test mode is for tests: `auto` keeps choosing cpu

    @classmethod
    def device_count(cls) -> int:
        return 1 if cls.cpu_mode() else cls.count_devices()

    @classmethod
    def count_devices(cls) -> int:
        """Devices of this kind here (the CPU test mode is one device)."""
        return getattr(torch, cls.device_kind).device_count()

    @classmethod
    def device_type(cls) -> str:
        return "cpu" if cls.cpu_mode() else cls.device_kind

    def __init__(self, device_index: int = 0, device_module: types.ModuleType | None = None) -> None:
        """device_module: torch.<device_kind> unless given (tests pass a fake with the same functions)."""
        super().__init__()
        self.device_module = device_module if device_module is not None else getattr(torch, self.device_kind)
        if self.cpu_mode():
            self.device = torch.device("cpu")
        else:
            self.device = torch.device(self.device_kind, device_index)
            self.device_module.set_device(self.device)  # kernels launch on the current device
        self.kernels = self.choose_kernels()  # "triton" | "torch"
        self._graphs = None  # DecodeGraphs once warm_up captured them

    def choose_kernels(self) -> str:
        """'triton' or 'torch': which implementation runs the ops here."""
        return "triton"

    # ---- memory ----------------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        if self.device.type == "cpu":
            return torch.float32  # the CPU test mode is the accuracy path, compared with HF in fp32
        return torch.bfloat16 if self.device_module.is_bf16_supported() else torch.float16

    def kv_block_size(self, head_dim: int) -> int:
        """32 tokens for head_dim <= 64, else 16 (vLLM's default).

        The attention kernel maps every key position through the block table, so any size is
        correct; what the size trades is block-table indirections per key tile (the kernel reads
        keys 32-64 positions at a time, so 16-token blocks mean up to 4 table entries per tile)
        against memory lost at the end of each sequence (up to block_size - 1 slots) and the
        granularity of block sharing. The lost bytes scale with block_size x head_dim, so keeping
        that product at about 2048 (32 x 64 = 16 x 128) keeps the waste the same while small heads
        get the fewer lookups; wider heads (>= 128) already move plenty of bytes per lookup."""
        return 32 if head_dim <= 64 else 16

    def memory_figures(self) -> tuple[int, int, str]:
        """(total bytes, bytes in use, how they were measured) of this device."""
        free, total = self.device_module.mem_get_info(self.device)
        return int(total), int(total - free), f"torch.{self.device_kind}.mem_get_info"

    def num_kv_blocks(self, config, bytes_per_block: int, hidden_size: int) -> int:
        """On the device: gpu_memory_utilization of its TOTAL memory, minus what is already in use
        (the loaded weights, the runtime's context, other processes), minus an activation reserve
        (see RESERVE_*). In the CPU test mode: the base class's kv_cache_gib sizing."""
        if self.device.type == "cpu":
            return super().num_kv_blocks(config, bytes_per_block, hidden_size)
        self.device_module.synchronize(self.device)
        self.device_module.empty_cache()  # loading temporaries cached by torch are free for the KV cache
        total, used, source = self.memory_figures()
        reserve = activation_reserve(config.token_budget, hidden_size)
        utilization = config.gpu_memory_utilization
        budget = int(total * utilization) - used - reserve
        blocks = budget // bytes_per_block
        if blocks < 1:
            raise RuntimeError(
                f"no {self.memory_name} memory left for the KV cache: {utilization:.0%} of "
                f"{total / GIB:.1f} GiB minus {used / GIB:.2f} GiB in use ({source}) and a "
                f"{reserve / GIB:.2f} GiB activation reserve leaves {budget / GIB:.2f} GiB; raise "
                "gpu_memory_utilization, lower token_budget or set num_kv_blocks"
            )
        log.info("%s KV cache: %d blocks (%.2f GiB) from %.1f GiB total, %.2f GiB in use (%s), "
                 "%.2f GiB activation reserve, gpu_memory_utilization %.2f", self.name, blocks,
                 blocks * bytes_per_block / GIB, total / GIB, used / GIB, source, reserve / GIB, utilization)
        return int(blocks)

    def prepare_batch(self, meta: BatchMeta) -> BatchMeta:
        """Each metadata tensor goes through pinned host memory and is copied asynchronously
        (torch's caching host allocator reuses the pinned buffers once their copies finish)."""
        if self.device.type == "cpu":
            return meta
        moved = {}
        for f in dataclasses.fields(meta):
            value = getattr(meta, f.name)
            if isinstance(value, torch.Tensor):
                value = self._to_device(value) if value.device.type == "cpu" else value.to(self.device)
            moved[f.name] = value
        moved["step_cache"] = {}  # scratch is per device and per step
        return BatchMeta(**moved)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device: a pinned, non-blocking copy (no stream sync)."""
        if self.device.type == "cpu":
            return t
        if not t.is_pinned():
            t = t.pin_memory()  # a staging buffer from torch's caching host allocator
        return t.to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        if self.device.type != "cpu":
            self.device_module.synchronize(self.device)

    # ---- decode graphs ---------------------------------------------------------------------
    def captures_graphs(self) -> bool:
        """Whether warm_up captures decode steps as device graphs (never in the CPU test mode)."""
        return False

    def warm_up(self, model, kv_cache, config, max_model_len: int, block_size: int) -> None:
        """Capture decode-step graphs (see cuda/graphs.py) unless enforce_eager or not supported.
        A model whose forward cannot be captured (e.g. it syncs with the host) keeps running
        eagerly, with a warning."""
        self._graphs = None
        if self.device.type == "cpu" or config.enforce_eager or not self.captures_graphs():
            return
        from splitfuse.backends.cuda.graphs import DecodeGraphs

        graphs = DecodeGraphs(model, kv_cache, max_batch=min(config.max_seqs, config.token_budget, MAX_GRAPH_BATCH),
                              max_model_len=max_model_len, block_size=block_size, device=self.device,
                              use_graphs=True, device_module=self.device_module)
        try:
            seconds = graphs.capture(GRAPH_CAPTURE_LIMIT_S)
        except Exception as exc:  # capture is an optimisation: never fail start-up for it
            log.warning("%s graph capture failed, decode steps run eagerly (enforce_eager=True hides "
                        "this): %s: %s", self.name, type(exc).__name__, exc)
            self.device_module.synchronize(self.device)
            return
        log.info("%s graphs: %d decode batch sizes up to %d captured in %.1f s", self.name, len(graphs.buckets),
                 graphs.max_batch, seconds)
        self._graphs = graphs

    def forward(self, model, meta: BatchMeta, kv_cache):
        graphs = self._graphs
        if graphs is not None and graphs.model is model and graphs.bucket_for(meta) is not None:
            return graphs.run(meta)
        return super().forward(model, meta, kv_cache)

    # ---- attention building blocks ---------------------------------------------------------
    @property
    def _triton(self) -> types.SimpleNamespace | None:
        """The Triton op modules when this backend runs them, else None (Backend's torch ops)."""
        return triton_ops() if self.kernels == "triton" else None

    def attention_impl(self, dtype: torch.dtype) -> str:
        """Which paged attention runs for a KV-cache dtype: 'triton' or 'torch' here; a subclass
        may name its own (and run it in paged_attention)."""
        return self.kernels

    def write_kv(self, kv_layer, k, v, slot_mapping) -> None:
        ops = self._triton
        if ops is None:
            return super().write_kv(kv_layer, k, v, slot_mapping)
        ops.rotary_kv.write_kv(k, v, kv_layer, slot_mapping)

    def paged_attention(self, q, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):
        if self.attention_impl(kv_layer.dtype) == "triton":
            return triton_ops().paged_attention.paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)
        return super().paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)

    def rotary_write_kv(self, q, k, v, positions, cos_sin, kv_layer, slot_mapping, rotary_dim=None,
                        interleaved=False):
        ops = self._triton
        if ops is None:
            return super().rotary_write_kv(q, k, v, positions, cos_sin, kv_layer, slot_mapping, rotary_dim, interleaved)
        # one launch rotates q and k and stores rotated k and v into the cache; attention then
        # reads every key (new ones included) from the cache
        q_rot, _ = ops.rotary_kv.rotary_and_cache(q, k, v, positions, cos_sin, kv_layer, slot_mapping, rotary_dim,
                                                  interleaved, return_k=False)
        return q_rot

    def rotary(self, q, k, positions, cos_sin, rotary_dim=None, interleaved=False):
        ops = self._triton
        if ops is None:
            return super().rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
        return ops.rotary_kv.rotary_and_cache(q, k, None, positions, cos_sin, None, None, rotary_dim, interleaved)

    # ---- per-token ops ---------------------------------------------------------------------
    def rms_norm(self, x, weight, eps, residual=None, weight_offset=0.0):
        ops = self._triton
        if ops is None:
            return super().rms_norm(x, weight, eps, residual, weight_offset)
        return ops.rms_norm.rms_norm(x, weight, eps, residual, weight_offset)

    def layer_norm(self, x, weight, bias, eps, residual=None):
        ops = self._triton
        if ops is None:
            return super().layer_norm(x, weight, bias, eps, residual)
        return ops.layer_norm.layer_norm(x, weight, bias, eps, residual)

    def silu_and_mul(self, x):
        ops = self._triton
        return super().silu_and_mul(x) if ops is None else ops.activation.silu_and_mul(x)

    def gelu_and_mul(self, x, approximate="none"):
        ops = self._triton
        return super().gelu_and_mul(x, approximate) if ops is None else ops.activation.gelu_and_mul(x, approximate)

    def moe_experts(self, x, topk_weights, topk_ids, w_gate_up, w_down, activation="silu"):
        ops = self._triton
        if ops is None:
            return super().moe_experts(x, topk_weights, topk_ids, w_gate_up, w_down, activation)
        return ops.moe.moe_experts(x, topk_weights, topk_ids, w_gate_up, w_down, activation)

    # ---- quantized linear ------------------------------------------------------------------
    def compute_capability(self) -> tuple[int, int] | None:
        """The CUDA compute capability of the device; None elsewhere (the CPU test mode, xpu)."""
        if self.device.type != "cuda":
            return None
        return tuple(self.device_module.get_device_capability(self.device))

    def prepare_linear_weight(self, weight: QuantizedWeight) -> QuantizedWeight:
        """fp8 -> _scaled_mm's layout on float8 GPUs; int8/int4 -> the Triton kernels' layout."""
        if fp8_linear.use_scaled_mm(weight, self.compute_capability()):
            return fp8_linear.prepare(weight)
        ops = self._triton
        return weight if ops is None else ops.quant_linear.prepare(weight)

    def linear(self, x, weight, bias=None):
        if isinstance(weight, QuantizedWeight):
            if weight.layout == fp8_linear.LAYOUT and x.dtype == fp8_linear.ACTIVATION_DTYPE:
                return fp8_linear.scaled_mm_linear(x, weight, bias)
            ops = self._triton
            if ops is not None and weight.layout in ops.quant_linear.LAYOUTS:
                return ops.quant_linear.quant_linear(x, weight, bias)
        return super().linear(x, weight, bias)

    # ---- description -----------------------------------------------------------------------
    def describe_ops(self) -> str:
        """What describe() adds about the op implementations ('' for nothing)."""
        return ""

    def describe(self) -> str:
        ops = self.describe_ops()
        ops = f"; {ops}" if ops else ""
        if self.device.type == "cpu":
            return f"{self.name} ({self.cpu_mode_label}{ops})"
        props = self.device_module.get_device_properties(self.device)
        return f"{self.name} ({props.name}, {props.total_memory / GIB:.0f} GiB, device {self.device.index}{ops})"


__all__ = ["DeviceBackend", "activation_reserve", "env_flag", "triton_ops"]
