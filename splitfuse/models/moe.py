"""Mixture-of-experts models on the Llama layout: Mixtral and Qwen2-MoE (shared expert with a
sigmoid gate, dense layers by `mlp_only_layers` / `decoder_sparse_step`).

Each sparse layer keeps its experts stacked, gate_up [E, 2I, H] and down [E, H, I], and runs them
with the backend's `moe_experts` op after `moe_route` picked each token's top-k.
Checkpoints may hold one tensor per expert (what transformers' save_pretrained writes) or the
stacked tensors (transformers' in-memory layout); both load.
"""

from __future__ import annotations

import re

import torch

from splitfuse.models.llama import LlamaForCausalLM

# model.layers.<i>.<block>.experts.<e>.<proj>.weight
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight")
# model.layers.<i>.<block>.experts.gate_up_proj | down_proj
_STACKED = re.compile(r"model\.layers\.(\d+)\.(\w+)\.experts\.(gate_up_proj|down_proj)")


class _SparseMoeLM(LlamaForCausalLM):
    """A Llama whose feed-forward is a top-k mixture of experts in the layers `is_sparse` names."""

    num_experts: int
    top_k: int
    renormalize: bool
    moe_block: str  # the checkpoint's name of a sparse layer's block ("mlp", "block_sparse_moe")
    # checkpoint projection name of one expert -> (0 gate, 1 up, or "down")
    expert_parts: dict[str, int | str]

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        self.sparse_layers = {i for i in range(self.num_layers) if self.is_sparse(i)}

    def is_sparse(self, layer: int) -> bool:
        return True

    # ---- weights ---------------------------------------------------------------------------
    def map_weight_name(self, name: str):
        m = _PER_EXPERT.fullmatch(name)
        if m and m.group(2) in (self.moe_block, "mlp") and m.group(4) in self.expert_parts:
            layer, expert, part = m.group(1), int(m.group(3)), self.expert_parts[m.group(4)]
            if part == "down":
                return f"layers.{layer}.experts.down", (expert, self.num_experts)
            # gate then up of expert 0, then of expert 1, ...: concatenated they view as [E, 2I, H]
            return f"layers.{layer}.experts.gate_up", (2 * expert + part, 2 * self.num_experts)
        m = _STACKED.fullmatch(name)
        if m and m.group(2) in (self.moe_block, "mlp"):
            return f"layers.{m.group(1)}.experts.{m.group(3).removesuffix('_proj')}", None
        if re.fullmatch(rf"model\.layers\.\d+\.({self.moe_block}|mlp)\.gate\.weight", name):
            return f"layers.{name.split('.')[2]}.router.weight", None
        return super().map_weight_name(name)

    def expected_weights(self) -> set[str]:
        names = super().expected_weights()
        for i in self.sparse_layers:
            names -= {f"layers.{i}.gate_up.weight", f"layers.{i}.down.weight"}
            names |= {f"layers.{i}.{n}" for n in ("router.weight", "experts.gate_up", "experts.down")}
        return names

    def load_weights(self, named_tensors) -> None:
        super().load_weights(named_tensors)
        for i in self.sparse_layers:
            for name in (f"layers.{i}.experts.gate_up", f"layers.{i}.experts.down"):
                w = self.weights[name]  # per-expert parts arrive concatenated along dim 0
                self.weights[name] = w.view(self.num_experts, -1, w.shape[-1])

    # ---- forward ---------------------------------------------------------------------------
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer not in self.sparse_layers:
            return super().mlp(layer, x)
        return self.sparse_mlp(layer, x)

    def sparse_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        ops, p = self.backend, f"layers.{layer}."
        weights, ids = ops.moe_route(ops.linear(x, self.weights[p + "router.weight"]), self.top_k, self.renormalize)
        return ops.moe_experts(x, weights, ids, self.weights[p + "experts.gate_up"], self.weights[p + "experts.down"])


class MixtralForCausalLM(_SparseMoeLM):
    """Mixtral: every layer sparse, top-k weights always renormalised; optional sliding window."""

    moe_block = "block_sparse_moe"
    expert_parts = {"w1": 0, "w3": 1, "w2": "down"}
    renormalize = True

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        super().__init__(config, backend, dtype, max_model_len)


class Qwen2MoeForCausalLM(_SparseMoeLM):
    """Qwen2-MoE: qkv biases, routed experts plus a shared expert scaled by sigmoid(gate(x))."""

    moe_block = "mlp"
    expert_parts = {"gate_proj": 0, "up_proj": 1, "down_proj": "down"}

    _SHARED = {
        "mlp.shared_expert.gate_proj.weight": ("shared.gate_up.weight", (0, 2)),
        "mlp.shared_expert.up_proj.weight": ("shared.gate_up.weight", (1, 2)),
        "mlp.shared_expert.down_proj.weight": ("shared.down.weight", None),
        "mlp.shared_expert_gate.weight": ("shared.gate.weight", None),
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.renormalize = bool(config.norm_topk_prob)
        self.mlp_only_layers = set(getattr(config, "mlp_only_layers", None) or [])
        self.sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
        self.has_shared_expert = bool(getattr(config, "shared_expert_intermediate_size", 0))
        super().__init__(config, backend, dtype, max_model_len)

    def is_sparse(self, layer: int) -> bool:
        # the rule of HF's Qwen2MoeDecoderLayer
        return layer not in self.mlp_only_layers and self.num_experts > 0 and (layer + 1) % self.sparse_step == 0

    def map_weight_name(self, name: str):
        if name.startswith("model.layers."):
            _, _, index, suffix = name.split(".", 3)
            if suffix in self._SHARED:
                ours, part = self._SHARED[suffix]
                return f"layers.{index}.{ours}", part
        return super().map_weight_name(name)

    def expected_weights(self) -> set[str]:
        names = super().expected_weights()
        if self.has_shared_expert:
            for i in self.sparse_layers:
                names |= {f"layers.{i}.shared.{n}.weight" for n in ("gate_up", "down", "gate")}
        return names

    def sparse_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        ops, w, p = self.backend, self.weights, f"layers.{layer}."
        weights, ids = ops.moe_route(ops.linear(x, w[p + "router.weight"]), self.top_k, self.renormalize)
        # HF casts the routing weights to the activations' dtype before weighing the experts
        routed = ops.moe_experts(x, weights.to(x.dtype), ids, w[p + "experts.gate_up"], w[p + "experts.down"])
        if not self.has_shared_expert:
            return routed
        shared = ops.linear(ops.silu_and_mul(ops.linear(x, w[p + "shared.gate_up.weight"])),
                            w[p + "shared.down.weight"])
        return routed + torch.sigmoid(ops.linear(x, w[p + "shared.gate.weight"])) * shared
