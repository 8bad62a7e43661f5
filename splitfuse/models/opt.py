"""OPT: learned positions (HF's table is offset by 2), ReLU MLP, biases, pre-LN
(`do_layer_norm_before`) or post-LN (350m), embeddings narrower than the hidden size through
project_in/project_out (`word_embed_proj_dim`), lm_head tied to the embeddings."""

from __future__ import annotations

import torch

from splitfuse.models.base import CausalLM, activation_op, add_norm
from splitfuse.models.weight_tables import COLUMN, ROW, VOCAB, Weight, fused, weight_and_bias
from splitfuse.parallel.layers import vocab_embedding, vocab_logits
from splitfuse.parallel.shard import Shard
from splitfuse.parallel.sharding import split_heads

_POSITION_OFFSET = 2  # OPT's position table starts 2 rows in (a fairseq legacy)


class OPTForCausalLM(CausalLM):
    """Tensor parallel as Llama (biases of out_proj and fc2 on rank 0 only); the learned positions,
    LayerNorms and the project_in/out matrices are replicated."""

    supports_tensor_parallel = True
    row_biases = (".o.bias", ".down.bias")
    # the hub's checkpoints name the decoder "decoder.", transformers' own "model.decoder."
    strip_prefixes = ("model.", "decoder.")
    global_weights = {
        "embed_tokens.weight": Weight("embed.weight", split=VOCAB),
        "embed_positions.weight": "positions.weight",
        "project_in.weight": Weight("project_in.weight", when="projected"),
        "project_out.weight": Weight("project_out.weight", when="projected"),
        **weight_and_bias({"final_layer_norm": "final_norm"}, when="affine_final_norm"),
        "lm_head.weight": Weight("lm_head.weight", when="not tie_word_embeddings", split=VOCAB),
    }
    layer_prefix = "layers."
    layer_weights = {
        **fused("qkv.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                splits=(COLUMN,) * 3),
        **fused("qkv.bias", ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
                when="has_bias", splits=(COLUMN,) * 3),
        **weight_and_bias({"fc1": "up"}, bias_when="has_bias", split=COLUMN),
        **weight_and_bias({"self_attn.out_proj": "o", "fc2": "down"}, bias_when="has_bias", split=ROW),
        **weight_and_bias({"self_attn_layer_norm": "attn_norm", "final_layer_norm": "mlp_norm"}, when="affine_norms"),
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        self.num_heads = self.num_kv_heads = self.total_kv_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_layers = config.num_hidden_layers
        self.scale = self.head_dim ** -0.5
        self.eps = 1e-5  # nn.LayerNorm's default: OPT's config has no field for it
        self.pre_norm = bool(config.do_layer_norm_before)
        self.final_norm = self.pre_norm and not getattr(config, "_remove_final_layer_norm", False)
        self.affine_norms = bool(getattr(config, "layer_norm_elementwise_affine", True))
        self.has_bias = bool(getattr(config, "enable_bias", True))
        self.projected = config.word_embed_proj_dim != self.hidden_size
        self.act = activation_op(backend, config.activation_function, "activation_function")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.affine_final_norm = self.final_norm and self.affine_norms

    def set_shard(self, shard: Shard) -> None:
        super().set_shard(shard)
        self.num_heads, self.num_kv_heads = split_heads(shard, type(self).__name__, self.num_heads,
                                                        self.total_kv_heads, ffn_dim=self.config.ffn_dim)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        ops, w = self.backend, self.weights
        hidden = vocab_embedding(ops, self.shard, input_ids, w["embed.weight"], self.vocab_size)
        if self.projected:
            hidden = ops.linear(hidden, w["project_in.weight"])
        hidden = hidden + ops.embedding(positions + _POSITION_OFFSET, w["positions.weight"])
        if self.pre_norm:
            hidden = self._pre_norm_layers(hidden, positions, meta, kv_cache)
        else:
            for i in range(self.num_layers):
                p = f"layers.{i}."
                attn = self._attention(p, hidden, meta, kv_cache[i])
                hidden, _ = self.norm(p + "attn_norm", attn, hidden)
                hidden, _ = self.norm(p + "mlp_norm", self._mlp(p, hidden), hidden)
        if self.projected:
            hidden = ops.linear(hidden, w["project_out.weight"])
        return hidden

    def _pre_norm_layers(self, hidden, positions, meta, kv_cache) -> torch.Tensor:
        residual = None
        for i in range(self.num_layers):
            p = f"layers.{i}."
            x, residual = add_norm(self.norm, p + "attn_norm", hidden, residual)
            x, residual = self.norm(p + "mlp_norm", self._attention(p, x, meta, kv_cache[i]), residual)
            hidden = self._mlp(p, x)
        if self.final_norm:
            return self.norm("final_norm", hidden, residual)[0]
        return hidden + residual

    def norm(self, name: str, x: torch.Tensor, residual: torch.Tensor | None = None):
        """LayerNorm `name` of x, or (normed, sum) of x + residual."""
        w = self.weights
        return self.backend.layer_norm(x, w.get(name + ".weight"), w.get(name + ".bias"), self.eps, residual)

    def _attention(self, p: str, x: torch.Tensor, meta, kv_layer) -> torch.Tensor:
        ops, w = self.backend, self.weights
        T = x.shape[0]
        q, k, v = ops.linear(x, w[p + "qkv.weight"], w.get(p + "qkv.bias")).chunk(3, dim=-1)
        q = q * self.scale  # HF scales q before the scores, so the scores are not scaled again
        shape = (T, self.num_heads, self.head_dim)
        attn = ops.attention(q.view(shape), k.view(shape), v.view(shape), kv_layer, meta, 1.0)
        return self.shard.all_reduce(ops.linear(attn.reshape(T, -1), w[p + "o.weight"], w.get(p + "o.bias")))

    def _mlp(self, p: str, x: torch.Tensor) -> torch.Tensor:
        ops, w = self.backend, self.weights
        return self.shard.all_reduce(ops.linear(self.act(ops.linear(x, w[p + "up.weight"], w.get(p + "up.bias"))),
                                                w[p + "down.weight"], w.get(p + "down.bias")))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [N, V]; with tensor parallelism on rank 0 only (None elsewhere)."""
        w = self.weights
        head = w["embed.weight"] if self.tie_word_embeddings else w["lm_head.weight"]
        return vocab_logits(self.backend, self.shard, hidden, head, self.vocab_size)
