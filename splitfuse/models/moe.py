"""Mixture-of-experts models on the Llama layout: Mixtral and Qwen2-MoE (shared expert with a
sigmoid gate, dense layers by `mlp_only_layers` / `decoder_sparse_step`).

Each sparse layer keeps its experts stacked, gate_up [E, 2I, H] and down [E, H, I], and runs them
with the backend's `moe_experts` op after `moe_route` picked each token's top-k.
Checkpoints may hold one tensor per expert (what transformers' save_pretrained writes) or the
stacked tensors (transformers' in-memory layout); both load. Quantized experts (on-the-fly, or
GPTQ/AWQ per-expert tensors) are ExpertWeights instead, run through the backend's `linear`.
"""

from __future__ import annotations

import torch

from splitfuse.models.llama import LlamaForCausalLM
from splitfuse.models.weight_tables import COLUMN, ROW, STACKED_DOWN, STACKED_GATE_UP, Weight, fused
from splitfuse.quant.experts import ExpertWeights, quantized_moe_experts


def per_expert_weights(gate: str, up: str, down: str) -> dict[str, Weight]:
    """One expert's projections: its gate then up rows in the stacked gate_up (so expert 0's gate,
    its up, expert 1's gate, ...: viewed as [E, 2I, H]), and its down rows in the stacked down.
    Tensor parallelism splits every expert along I: gate and up by rows, down by columns."""
    return {f"{gate}.weight": Weight("experts.gate_up", 0, 2, when="is_sparse", split=COLUMN),
            f"{up}.weight": Weight("experts.gate_up", 1, 2, when="is_sparse", split=COLUMN),
            f"{down}.weight": Weight("experts.down", 0, 1, when="is_sparse", split=ROW)}


def sparse_block_weights(blocks: tuple[str, ...]) -> dict[str, Weight]:
    """A sparse layer's router, and its experts as stacked tensors (transformers' in-memory layout)."""
    table = {}
    for block in blocks:
        table[f"{block}.gate.weight"] = Weight("router.weight", when="is_sparse")
        table[f"{block}.experts.gate_up_proj"] = Weight("experts.gate_up", when="is_sparse", split=STACKED_GATE_UP)
        table[f"{block}.experts.down_proj"] = Weight("experts.down", when="is_sparse", split=STACKED_DOWN)
    return table


class _SparseMoeLM(LlamaForCausalLM):
    """A Llama whose feed-forward is a top-k mixture of experts in the layers `is_sparse` names."""

    num_experts: int
    top_k: int
    renormalize: bool
    loads_quantized_weights = True  # load_weights leaves quantized experts (ExpertWeights) as they are

    # dense layers keep Llama's MLP; a sparse one holds a router and the experts instead
    layer_weights = {
        **LlamaForCausalLM.layer_weights,
        **fused("gate_up.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], when="not is_sparse",
                splits=(COLUMN, COLUMN)),
        "mlp.down_proj.weight": Weight("down.weight", when="not is_sparse", split=ROW),
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        self.sparse_layers = {i for i in range(self.num_layers) if self.is_sparse(i)}

    def is_sparse(self, layer: int) -> bool:
        return True

    # ---- weights ---------------------------------------------------------------------------
    def load_weights(self, named_tensors) -> None:
        super().load_weights(named_tensors)
        for i in self.sparse_layers:
            for name in (f"layers.{i}.experts.gate_up", f"layers.{i}.experts.down"):
                w = self.weights[name]  # per-expert parts arrive concatenated along dim 0
                if isinstance(w, torch.Tensor):
                    self.weights[name] = w.view(self.num_experts, -1, w.shape[-1])

    # ---- forward ---------------------------------------------------------------------------
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer not in self.sparse_layers:
            return super().mlp(layer, x)
        return self.sparse_mlp(layer, x)

    def sparse_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        ops, p = self.backend, f"layers.{layer}."
        weights, ids = ops.moe_route(ops.linear(x, self.weights[p + "router.weight"]), self.top_k, self.renormalize)
        return self.routed_experts(layer, x, weights, ids)

    def routed_experts(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for x [T, H] (stacked float or quantized experts)."""
        gate_up, down = self.weights[f"layers.{layer}.experts.gate_up"], self.weights[f"layers.{layer}.experts.down"]
        if isinstance(gate_up, ExpertWeights) or isinstance(down, ExpertWeights):
            return quantized_moe_experts(self.backend, x, weights, ids, gate_up, down)
        return self.backend.moe_experts(x, weights, ids, gate_up, down)


class MixtralForCausalLM(_SparseMoeLM):
    """Mixtral: every layer sparse, top-k weights always renormalised; optional sliding window.
    Tensor parallel as Llama, each expert split along its intermediate dimension and the router
    replicated: every rank routes alike, and one all-reduce sums the experts' partial outputs."""

    supports_tensor_parallel = True

    expert_blocks = ("block_sparse_moe", "mlp")  # transformers' older and newer name of the block
    expert_weights = per_expert_weights("w1", "w3", "w2")
    layer_weights = {**_SparseMoeLM.layer_weights, **sparse_block_weights(expert_blocks)}
    renormalize = True

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        super().__init__(config, backend, dtype, max_model_len)


class Qwen2MoeForCausalLM(_SparseMoeLM):
    """Qwen2-MoE: qkv biases, routed experts plus a shared expert scaled by sigmoid(gate(x)).
    Tensor parallel as Mixtral; the shared expert split like a dense MLP and its one-row gate
    replicated: the gate scales each rank's partial output alike, so the all-reduce sums it right."""

    supports_tensor_parallel = True

    expert_blocks = ("mlp",)
    expert_weights = per_expert_weights("gate_proj", "up_proj", "down_proj")
    layer_weights = {
        **_SparseMoeLM.layer_weights,
        **sparse_block_weights(expert_blocks),
        **fused("shared.gate_up.weight", ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"],
                when="has_shared_expert_at", splits=(COLUMN, COLUMN)),
        "mlp.shared_expert.down_proj.weight": Weight("shared.down.weight", when="has_shared_expert_at", split=ROW),
        "mlp.shared_expert_gate.weight": Weight("shared.gate.weight", when="has_shared_expert_at"),
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.renormalize = bool(config.norm_topk_prob)
        self.mlp_only_layers = set(getattr(config, "mlp_only_layers", None) or [])
        self.sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
        self.has_shared_expert = bool(getattr(config, "shared_expert_intermediate_size", 0))
        super().__init__(config, backend, dtype, max_model_len)
        self.qkv_bias = bool(getattr(config, "qkv_bias", True))

    def tensor_parallel_sizes(self) -> dict[str, int]:
        sizes = {**super().tensor_parallel_sizes(), "moe_intermediate_size": self.config.moe_intermediate_size}
        if self.has_shared_expert:
            sizes["shared_expert_intermediate_size"] = self.config.shared_expert_intermediate_size
        return sizes

    def is_sparse(self, layer: int) -> bool:
        # the rule of HF's Qwen2MoeDecoderLayer
        return layer not in self.mlp_only_layers and self.num_experts > 0 and (layer + 1) % self.sparse_step == 0

    def has_shared_expert_at(self, layer: int) -> bool:
        return self.has_shared_expert and self.is_sparse(layer)

    def sparse_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        ops, w, p = self.backend, self.weights, f"layers.{layer}."
        weights, ids = ops.moe_route(ops.linear(x, w[p + "router.weight"]), self.top_k, self.renormalize)
        # HF casts the routing weights to the activations' dtype before weighing the experts
        routed = self.routed_experts(layer, x, weights.to(x.dtype), ids)
        if not self.has_shared_expert:
            return routed
        shared = ops.linear(ops.silu_and_mul(ops.linear(x, w[p + "shared.gate_up.weight"])),
                            w[p + "shared.down.weight"])
        return routed + torch.sigmoid(ops.linear(x, w[p + "shared.gate.weight"])) * shared
