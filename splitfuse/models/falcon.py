"""Falcon: the 7B layout (multi-query, attention and MLP in parallel from one LayerNorm) and the
new decoder architecture of 40B/180B (grouped KV heads, `ln_attn`/`ln_mlp` or one LayerNorm per
`num_ln_in_parallel_attn`); rotary only.

The fused `query_key_value` matrix is reordered at load time into our [q | k | v] rows:
- new decoder architecture: per KV group, its query heads, then its key, then its value head;
- multi_query (7B): all query heads, then the one key head, then the one value head (already ours);
- otherwise: per head, its query, key and value.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from splitfuse.models.phi import LayerNormDecoderLM
from splitfuse.models.weight_tables import COLUMN, FUSED_QKV, GROUPED_QKV, ROW, VOCAB, Weight, weight_and_bias
from splitfuse.parallel.sharding import Slices, checkpoint_slice


class FalconForCausalLM(LayerNormDecoderLM):
    """Tensor parallel as Phi; each rank reads its query heads' rows of query_key_value with their
    KV heads (in either layout), so the reordering below sees a smaller model of the same layout."""

    supports_tensor_parallel = True
    global_weights = {
        "transformer.word_embeddings.weight": Weight("embed.weight", split=VOCAB),
        "lm_head.weight": Weight("lm_head.weight", when="not tie_word_embeddings", split=VOCAB),
        **weight_and_bias({"transformer.ln_f": "final_norm"}),
    }
    layer_prefix = "transformer.h."
    layer_weights = {
        # query_key_value's split depends on the layout: see checkpoint_slice
        **weight_and_bias({"self_attention.query_key_value": "qkv"}, bias_when="has_bias"),
        **weight_and_bias({"mlp.dense_h_to_4h": "up"}, bias_when="has_bias", split=COLUMN),
        **weight_and_bias({"self_attention.dense": "o", "mlp.dense_4h_to_h": "down"}, bias_when="has_bias",
                          split=ROW),
        # the 7B layout and Falcon2 name the attention's LayerNorm input_layernorm, 40B ln_attn
        **weight_and_bias({"input_layernorm": "attn_norm", "ln_attn": "attn_norm"}),
        **weight_and_bias({"ln_mlp": "mlp_norm", "post_attention_layernorm": "mlp_norm"}, when="mlp_norm"),
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        if getattr(config, "alibi", False):
            raise ValueError("FalconForCausalLM: config field alibi=True (ALiBi position biases) is not "
                             "supported; only rotary Falcon models (alibi=False) are")
        self.new_arch = bool(config.new_decoder_architecture)
        self.multi_query = bool(config.multi_query) and not self.new_arch
        if self.new_arch:
            num_kv_heads = config.num_kv_heads
            num_norms = config.num_ln_in_parallel_attn or 2
            if num_norms not in (1, 2):
                raise ValueError(f"FalconForCausalLM: config field num_ln_in_parallel_attn must be 1 or 2, "
                                 f"got {num_norms}")
            parallel, mlp_norm = True, num_norms == 2  # the new architecture is always parallel
        else:
            num_kv_heads = 1 if self.multi_query else config.num_attention_heads
            parallel = bool(config.parallel_attn)
            mlp_norm = not parallel  # post_attention_layernorm of the sequential layout
        super().__init__(
            config, backend, dtype, max_model_len, num_kv_heads=num_kv_heads, eps=config.layer_norm_epsilon,
            activation=config.activation, activation_field="activation", parallel=parallel, mlp_norm=mlp_norm,
            has_bias=bool(config.bias),
        )

    def tensor_parallel_sizes(self) -> dict[str, int]:
        return {"ffn_hidden_size": self.config.ffn_hidden_size or 4 * self.hidden_size}

    def checkpoint_slice(self, name: str, shape: list[int]) -> Slices | None:
        if ".query_key_value." not in name:
            return super().checkpoint_slice(name, shape)
        split = FUSED_QKV if self.multi_query else GROUPED_QKV
        return checkpoint_slice(split, shape, self.shard, self.total_kv_heads, self.head_dim)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(named_tensors)
        if self.multi_query:
            return
        for i in range(self.num_layers):
            for name in (f"layers.{i}.qkv.weight", f"layers.{i}.qkv.bias"):
                if name in self.weights:
                    self.weights[name] = self._grouped_to_q_k_v(self.weights[name])

    def _grouped_to_q_k_v(self, t: torch.Tensor) -> torch.Tensor:
        """Rows grouped per KV head as [q_0 .. q_G-1, k, v] (G query heads each) -> [all q | all k | all v]."""
        G = self.num_heads // self.num_kv_heads
        groups = t.unflatten(0, (self.num_kv_heads, G + 2, self.head_dim))
        q, k, v = groups[:, :G], groups[:, G], groups[:, G + 1]
        return torch.cat([q.flatten(0, 2), k.flatten(0, 1), v.flatten(0, 1)]).contiguous()
