"""The backend contract, version 2.

A backend owns a device: it allocates the paged KV cache there and runs the ops models are written
against. Every op has a default here built from plain torch ops (the reference, see torch_ops.py),
so a new backend overrides only what it accelerates.

Attention is built from building blocks: a backend implements `write_kv` and `paged_attention`
(and optionally a fused `rotary_write_kv`); `attention` and `rotary_attention`, which models
call, are composed from them here once. A backend that fuses a whole composite may still
override it. A backend written for version 1 (which overrode `attention`) is registered through
`splitfuse.backends.v1_adapter`, which keeps its behaviour. Shapes use T tokens of one ragged batch,
S sequences, H query heads, Hkv key/value heads, D head size.

KV cache: one tensor per layer, [2, num_blocks, block_size, Hkv, D] (index 0 keys, 1 values);
a token at position p of a sequence lives in slot block_table[p // block_size] * block_size +
p % block_size.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from splitfuse.backends import torch_ops
from splitfuse.core.batch import BatchMeta
from splitfuse.core.sampler import SamplingBatch, sample_tokens
from splitfuse.quant.weights import QuantizedWeight

CONTRACT_VERSION = 2


class Backend:
    """Base class of every backend; subclasses set `name`, `priority` and the device hooks."""

    name: ClassVar[str] = "base"
    priority: ClassVar[int] = 0  # `auto` picks the highest-priority available backend
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
    # QuantizedWeight formats ("int8", "int4") this backend claims `linear` runs correctly: the
    # conformance kit checks each claimed one (the default linear dequantizes any of them)
    quantized_formats: ClassVar[tuple[str, ...]] = ()
    contract_version: ClassVar[int] = CONTRACT_VERSION

    # ---- discovery -------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() == ""

    @classmethod
    def unavailable_reason(cls) -> str:
        """Empty when usable, else one line that tells the user why not."""
        return ""

    @classmethod
    def auto_selectable(cls) -> bool:
        """Whether `auto` may pick this backend when it is available (a test-only mode may say no)."""
        return True

    @classmethod
    def device_count(cls) -> int:
        """Devices of this kind here; replicas are spread over them (device_index 0..count-1)."""
        return 1

    @classmethod
    def device_type(cls) -> str:
        """The torch device type this backend runs on here ("cpu", "cuda", ...), asked before any
        instance exists: front ends plan CPU threads and devices by it."""
        return "cpu"

    @classmethod
    def distributed_backend(cls) -> str:
        """The torch.distributed process-group backend tensor-parallel ranks on this device join."""
        return "gloo"

    def __init__(self, device_index: int = 0) -> None:
        self.device = torch.device("cpu")

    # ---- memory ----------------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        """The dtype used for dtype="auto"."""
        return torch.float32

    def kv_block_size(self, head_dim: int) -> int:
        """Tokens per KV block when the user does not set one."""
        return 16

    def num_kv_blocks(self, config, bytes_per_block: int, hidden_size: int) -> int:
        """How many KV blocks fit, once the model is loaded (hidden_size lets a backend keep room
        for a step's activations); the default sizes the cache to `config.kv_cache_gib`."""
        return max(1, int(config.kv_cache_gib * (1 << 30)) // bytes_per_block)

    def allocate_kv_cache(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype,
    ) -> list[torch.Tensor]:
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    def prepare_batch(self, meta: BatchMeta) -> BatchMeta:
        """Move step metadata built on the host to the device (one copy per step)."""
        return meta if self.device.type == "cpu" else meta.to(self.device)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); nothing to do on the CPU."""

    def warm_up(self, model, kv_cache: list[torch.Tensor], config, max_model_len: int, block_size: int) -> None:
        """Called once the model is loaded and its KV cache allocated, before the first step: the
        place to capture graphs or tune kernels. Nothing to do by default."""

    def forward(self, model, meta: BatchMeta, kv_cache: list[torch.Tensor]) -> torch.Tensor:
        """Run the model over one step's ragged batch and return its hidden states [T, hidden]; a
        backend may replay a captured graph here instead of launching op by op."""
        return model.forward(meta.input_ids, meta.positions, meta, kv_cache)

    # ---- model ops -------------------------------------------------------------------------
    def embedding(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(input_ids, weight)

    def linear(self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ weight.T + bias; weight is a tensor [N, K] or a QuantizedWeight (weight-only
        int8/int4, see splitfuse.quant), which this reference dequantizes before the matmul."""
        return torch_ops.linear(x, weight, bias)

    def prepare_linear_weight(self, weight: QuantizedWeight) -> QuantizedWeight:
        """Called once per quantized matrix at load: return it in the layout this backend's `linear`
        reads (a repacked copy for a kernel's own layout); the portable layout by default."""
        return weight

    # ---- attention: building blocks ------------------------------------------------------
    def write_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v [T, Hkv, D] into kv_layer [2, num_blocks, block_size, Hkv, D] at slot_mapping [T]."""
        torch_ops.write_kv(kv_layer, k, v, slot_mapping)

    def paged_attention(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: BatchMeta, scale: float,
        sliding_window: int | None = None, logit_softcap: float | None = None,
    ) -> torch.Tensor:
        """Causal attention of q [T, H, D] over each sequence's cached keys (the step's new keys are
        already written); prompt chunks and decodes in one call; GQA. Returns [T, H, D].
        sliding_window: a query at position p sees keys at positions > p - sliding_window;
        logit_softcap c: scores become c * tanh(s / c)."""
        return torch_ops.paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)

    def rotary_write_kv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
        kv_layer: torch.Tensor, slot_mapping: torch.Tensor, rotary_dim: int | None = None,
        interleaved: bool = False,
    ) -> torch.Tensor:
        """Rotate q and k, store the rotated k and v at slot_mapping, return the rotated q. The default
        is rotary() then write_kv(); a backend fuses them into one pass by overriding this."""
        q, k = self.rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
        self.write_kv(kv_layer, k, v, slot_mapping)
        return q

    # ---- attention: what models call, composed once from the building blocks ---------------
    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: BatchMeta,
        scale: float, sliding_window: int | None = None, logit_softcap: float | None = None,
    ) -> torch.Tensor:
        """write_kv() of k/v [T, Hkv, D] at meta.slot_mapping, then paged_attention() of q [T, H, D]."""
        self.write_kv(kv_layer, k, v, meta.slot_mapping)
        return self.paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)

    def rotary_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
        kv_layer: torch.Tensor, meta: BatchMeta, scale: float, sliding_window: int | None = None,
        logit_softcap: float | None = None, rotary_dim: int | None = None, interleaved: bool = False,
    ) -> torch.Tensor:
        """rotary_write_kv() then paged_attention(): models with rotary embeddings call this."""
        q = self.rotary_write_kv(q, k, v, positions, cos_sin, kv_layer, meta.slot_mapping, rotary_dim, interleaved)
        return self.paged_attention(q, kv_layer, meta, scale, sliding_window, logit_softcap)

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
        rotary_dim: int | None = None, interleaved: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate the first rotary_dim features of q [T, H, D] and k [T, Hkv, D]; cos_sin is
        [max_positions, rotary_dim] holding cos then sin of each frequency (see torch_ops)."""
        return torch_ops.rotary(q, k, positions, cos_sin, rotary_dim, interleaved)

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
        weight_offset: float = 0.0,
    ):
        """RMSNorm of x (or of x + residual, returning (normed, x + residual)); weight_offset 1
        gives Gemma's (1 + weight) scaling."""
        return torch_ops.rms_norm(x, weight, eps, residual, weight_offset)

    def layer_norm(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
        residual: torch.Tensor | None = None,
    ):
        return torch_ops.layer_norm(x, weight, bias, eps, residual)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., 2I] = [gate | up] -> silu(gate) * up."""
        return torch_ops.silu_and_mul(x)

    def gelu_and_mul(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        """x [..., 2I] = [gate | up] -> gelu(gate) * up (GeGLU)."""
        return torch_ops.gelu_and_mul(x, approximate)

    def gelu(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate=approximate)

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def moe_route(self, router_logits: torch.Tensor, top_k: int, renormalize: bool):
        """Top-k experts of each token from router_logits [T, E] as HF routes them (float32
        softmax, torch.topk, optional renormalisation): (weights [T, k] float32, ids [T, k] int64)."""
        return torch_ops.moe_route(router_logits, top_k, renormalize)

    def moe_experts(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
        w_down: torch.Tensor, activation: str = "silu",
    ) -> torch.Tensor:
        """Mixture-of-experts MLP of x [T, H]: each token's top-k experts (w_gate_up [E, 2I, H],
        w_down [E, H, I]) weighted by topk_weights [T, k] and summed; returns [T, H]."""
        return torch_ops.moe_experts(x, topk_weights, topk_ids, w_gate_up, w_down, activation)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Next token per row of logits [S', V] (float32), one int64 per row."""
        return sample_tokens(logits, batch)

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
