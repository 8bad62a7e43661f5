"""The Llama family: Llama 2/3 (GQA, llama3 rope scaling, tied embeddings), Mistral (sliding
window) and Qwen2 (qkv bias), written against backend ops only.

q/k/v and gate/up projections are fused into one matrix each at load time: one matmul instead of
three (or two) per layer.
"""

from __future__ import annotations

import torch

from splitfuse.models.base import CausalLM, add_norm
from splitfuse.models.rope import rope_cos_sin
from splitfuse.models.weight_tables import COLUMN, KV_COLUMN, ROW, VOCAB, Weight, fused
from splitfuse.parallel.layers import vocab_embedding, vocab_logits
from splitfuse.parallel.shard import Shard
from splitfuse.parallel.sharding import split_heads


_QKV_SPLITS = (COLUMN, KV_COLUMN, KV_COLUMN)


class LlamaForCausalLM(CausalLM):
    """Tensor parallel as Megatron splits it: q/k/v and gate/up by output features, o and down by
    input features (one all-reduce after each), embedding and lm_head by vocabulary rows."""

    supports_tensor_parallel = True
    global_weights = {
        "model.embed_tokens.weight": Weight("embed_tokens.weight", split=VOCAB),
        "model.norm.weight": "norm.weight",
        "lm_head.weight": Weight("lm_head.weight", when="not tie_word_embeddings", split=VOCAB),
    }
    layer_weights = {
        **fused("qkv.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                splits=_QKV_SPLITS),
        **fused("qkv.bias", ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
                when="qkv_bias", splits=_QKV_SPLITS),
        **fused("gate_up.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], splits=(COLUMN, COLUMN)),
        "self_attn.o_proj.weight": Weight("o.weight", split=ROW),
        "mlp.down_proj.weight": Weight("down.weight", split=ROW),
        "input_layernorm.weight": "input_norm.weight",
        "post_attention_layernorm.weight": "post_norm.weight",
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        self.num_layers = config.num_hidden_layers
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.qkv_bias = bool(getattr(config, "attention_bias", False))
        self.sliding_windows = self._sliding_windows(config)
        self.cos_sin = rope_cos_sin(config, self.head_dim, max_model_len, dtype, backend.device)
        self.total_kv_heads = self.num_kv_heads  # the checkpoint's; num_kv_heads is this rank's
        self.rotary_dim: int | None = None  # None: rotate the whole head

    def set_shard(self, shard: Shard) -> None:
        """Keep num_heads / size query heads and the matching KV heads (one replicated KV head per
        rank where the model has fewer KV heads than ranks)."""
        super().set_shard(shard)
        self.num_heads, self.num_kv_heads = split_heads(shard, type(self).__name__, self.num_heads,
                                                        self.total_kv_heads, **self.tensor_parallel_sizes())

    def tensor_parallel_sizes(self) -> dict[str, int]:
        """Config fields (-> values) besides the heads that the rank count must divide."""
        return {"intermediate_size": self.config.intermediate_size}

    def _sliding_windows(self, config) -> list[int | None]:
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None or getattr(config, "use_sliding_window", True) is False:
            return [None] * self.num_layers
        if layer_types:
            return [window if t == "sliding_attention" else None for t in layer_types]
        return [window] * self.num_layers

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        ops, w = self.backend, self.weights
        hidden = vocab_embedding(ops, self.shard, input_ids, w["embed_tokens.weight"], self.vocab_size)
        residual = None
        rope_positions = self.rope_positions(positions, meta)
        for i in range(self.num_layers):
            p = f"layers.{i}."
            x, residual = add_norm(self.norm, p + "input_norm", hidden, residual)
            q, k, v = self.project_qkv(p, x)
            attn = ops.rotary_attention(q, k, v, rope_positions, self.cos_sin, kv_cache[i], meta, self.scale,
                                        self.sliding_windows[i], rotary_dim=self.rotary_dim)
            hidden = self.shard.all_reduce(ops.linear(attn.reshape(attn.shape[0], -1), w[p + "o.weight"]))
            x, residual = self.norm(p + "post_norm", hidden, residual)
            hidden = self.shard.all_reduce(self.mlp(i, x))
        hidden, _ = self.norm("norm", hidden, residual)
        return hidden

    # Pieces a subclass overrides, so the layer loop above stays in one place.
    def norm(self, name: str, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm `name` of x, or (normed, sum) of x + residual."""
        return self.backend.rms_norm(x, self.weights[name + ".weight"], self.eps, residual)

    def project_qkv(self, prefix: str, x: torch.Tensor):
        """q [T, H, D], k and v [T, Hkv, D] of the normed hidden states x [T, hidden]."""
        qkv = self.backend.linear(x, self.weights[prefix + "qkv.weight"], self.weights.get(prefix + "qkv.bias"))
        H, Hkv = self.num_heads, self.num_kv_heads
        # one view and one split: half the Python time of splitting features, then viewing each part
        return qkv.view(x.shape[0], H + 2 * Hkv, self.head_dim).split_with_sizes((H, Hkv, Hkv), 1)

    def rope_positions(self, positions: torch.Tensor, meta) -> torch.Tensor:
        """Row of self.cos_sin each token is rotated with: its position, unless the rope picks tables."""
        return positions

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward block of layer `layer` on the normed hidden states x [T, hidden]."""
        ops, p = self.backend, f"layers.{layer}."
        return ops.linear(ops.silu_and_mul(ops.linear(x, self.weights[p + "gate_up.weight"])),
                          self.weights[p + "down.weight"])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [N, V] of hidden [N, hidden]; with tensor parallelism on rank 0 only (None elsewhere)."""
        head = self.weights["embed_tokens.weight"] if self.tie_word_embeddings else self.weights["lm_head.weight"]
        return vocab_logits(self.backend, self.shard, hidden, head, self.vocab_size)


class MistralForCausalLM(LlamaForCausalLM):
    """Same layout as Llama; the config's sliding_window is honoured."""

    supports_tensor_parallel = True


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama layout with q/k/v biases."""

    supports_tensor_parallel = True

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        self.qkv_bias = True  # Qwen2's attention always has them; its config has no field for it
