"""Phi-2, and the LayerNorm decoder it shares with Falcon: rotary attention (possibly on part of
each head) and a plain MLP, run in parallel from one normed input or one after the other.

Weights live under our own names, so each architecture only maps its checkpoint names:
embed, final_norm, lm_head and per layer attn_norm, mlp_norm, qkv, o, up, down, q_norm, k_norm
(each `.weight`, most with `.bias`).
"""

from __future__ import annotations

import torch

from splitfuse.models.base import CausalLM, activation_op, add_norm
from splitfuse.models.rope import rope_cos_sin
from splitfuse.models.weight_tables import COLUMN, KV_COLUMN, ROW, VOCAB, Weight, fused, weight_and_bias
from splitfuse.parallel.layers import vocab_embedding, vocab_logits
from splitfuse.parallel.shard import Shard
from splitfuse.parallel.sharding import split_heads

QKV_SPLITS = (COLUMN, KV_COLUMN, KV_COLUMN)


class LayerNormDecoderLM(CausalLM):
    """Rotary-attention decoder of LayerNorm blocks; subclasses read their config and declare the
    weight tables. Conditions the tables may use: tie_word_embeddings, lm_head_bias, has_bias,
    mlp_norm, qk_norm.

    Tensor parallel as Llama (qkv and up by output features, o and down by input features, their
    biases on rank 0 only); the parallel layout sums attention and MLP before one all-reduce."""

    row_biases = (".o.bias", ".down.bias")

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int, *, num_kv_heads: int,
                 eps: float, activation: str, activation_field: str, parallel: bool, mlp_norm: bool,
                 has_bias: bool, rotary_dim: int | None = None, qk_norm: bool = False,
                 lm_head_bias: bool = False) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_layers = config.num_hidden_layers
        self.eps = eps
        self.scale = self.head_dim ** -0.5
        self.act = activation_op(backend, activation, activation_field)
        self.parallel = parallel  # attention and MLP both read the layer's input
        self.mlp_norm = mlp_norm  # the MLP has its own LayerNorm (after attention, or beside it)
        self.has_bias = has_bias
        self.qk_norm = qk_norm  # per-head LayerNorm of q and k before the rotary
        self.lm_head_bias = lm_head_bias
        self.rotary_dim = rotary_dim if rotary_dim and rotary_dim < self.head_dim else None
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.cos_sin = rope_cos_sin(config, self.head_dim, max_model_len, dtype, backend.device,
                                    rotary_dim=self.rotary_dim)
        self.total_kv_heads = num_kv_heads
        self._set_qkv_sizes()

    def _set_qkv_sizes(self) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = (q, kv, kv)

    def set_shard(self, shard: Shard) -> None:
        super().set_shard(shard)
        self.num_heads, self.num_kv_heads = split_heads(shard, type(self).__name__, self.num_heads,
                                                        self.total_kv_heads, **self.tensor_parallel_sizes())
        self._set_qkv_sizes()

    def tensor_parallel_sizes(self) -> dict[str, int]:
        """Config fields (-> values) besides the heads that the rank count must divide."""
        return {}

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        reduce = self.shard.all_reduce
        hidden = vocab_embedding(self.backend, self.shard, input_ids, self.weights["embed.weight"], self.vocab_size)
        residual = None
        for i in range(self.num_layers):
            p = f"layers.{i}."
            x, residual = add_norm(self.norm, p + "attn_norm", hidden, residual)
            attn = self._attention(p, x, positions, meta, kv_cache[i])
            if self.parallel:
                # HF adds attention and MLP outputs first, then the residual (in the next norm)
                mlp_in = self.norm(p + "mlp_norm", residual) if self.mlp_norm else x
                hidden = reduce(attn + self._mlp(p, mlp_in))
            else:
                x, residual = self.norm(p + "mlp_norm", reduce(attn), residual)
                hidden = reduce(self._mlp(p, x))
        hidden, _ = self.norm("final_norm", hidden, residual)
        return hidden

    def norm(self, name: str, x: torch.Tensor, residual: torch.Tensor | None = None):
        """LayerNorm `name` of x, or (normed, sum) of x + residual."""
        w = self.weights
        return self.backend.layer_norm(x, w.get(name + ".weight"), w.get(name + ".bias"), self.eps, residual)

    def _attention(self, p: str, x: torch.Tensor, positions, meta, kv_layer) -> torch.Tensor:
        ops, w = self.backend, self.weights
        T = x.shape[0]
        q, k, v = ops.linear(x, w[p + "qkv.weight"], w.get(p + "qkv.bias")).split(self.qkv_sizes, dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = ops.layer_norm(q, w[p + "q_norm.weight"], w[p + "q_norm.bias"], self.eps)
            k = ops.layer_norm(k, w[p + "k_norm.weight"], w[p + "k_norm.bias"], self.eps)
        attn = ops.rotary_attention(q, k, v, positions, self.cos_sin, kv_layer, meta, self.scale,
                                    rotary_dim=self.rotary_dim)
        return ops.linear(attn.reshape(T, -1), w[p + "o.weight"], w.get(p + "o.bias"))

    def _mlp(self, p: str, x: torch.Tensor) -> torch.Tensor:
        ops, w = self.backend, self.weights
        up = self.act(ops.linear(x, w[p + "up.weight"], w.get(p + "up.bias")))
        return ops.linear(up, w[p + "down.weight"], w.get(p + "down.bias"))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [N, V]; with tensor parallelism on rank 0 only (None elsewhere)."""
        w = self.weights
        head = w["embed.weight"] if self.tie_word_embeddings else w["lm_head.weight"]
        return vocab_logits(self.backend, self.shard, hidden, head, self.vocab_size, w.get("lm_head.bias"))


class PhiForCausalLM(LayerNormDecoderLM):
    """Phi-2: partial rotary, attention and MLP in parallel from one LayerNorm, biases everywhere,
    lm_head with a bias, optional per-head LayerNorm of q and k (replicated: each rank norms its heads)."""

    supports_tensor_parallel = True
    global_weights = {
        "model.embed_tokens.weight": Weight("embed.weight", split=VOCAB),
        "lm_head.weight": Weight("lm_head.weight", when="not tie_word_embeddings", split=VOCAB),
        "lm_head.bias": Weight("lm_head.bias", when="lm_head_bias", split=VOCAB),
        **weight_and_bias({"model.final_layernorm": "final_norm"}),
    }
    layer_weights = {
        **fused("qkv.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                splits=QKV_SPLITS),
        **fused("qkv.bias", ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
                when="has_bias", splits=QKV_SPLITS),
        **weight_and_bias({"mlp.fc1": "up"}, bias_when="has_bias", split=COLUMN),
        **weight_and_bias({"self_attn.dense": "o", "mlp.fc2": "down"}, bias_when="has_bias", split=ROW),
        **weight_and_bias({"input_layernorm": "attn_norm"}),
        **weight_and_bias({"self_attn.q_layernorm": "q_norm", "self_attn.k_layernorm": "k_norm"}, when="qk_norm"),
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        head_dim = config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        super().__init__(
            config, backend, dtype, max_model_len,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            eps=config.layer_norm_eps, activation=config.hidden_act, activation_field="hidden_act",
            parallel=True, mlp_norm=False, has_bias=True, rotary_dim=int(head_dim * factor),
            qk_norm=bool(getattr(config, "qk_layernorm", False)), lm_head_bias=True,
        )

    def tensor_parallel_sizes(self) -> dict[str, int]:
        return {"intermediate_size": self.config.intermediate_size}
