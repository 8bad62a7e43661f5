"""Gemma 2: the Llama layout plus sandwich norms (RMSNorm before and after attention and MLP, all
scaling by 1 + weight), GeGLU, attention scaled by `query_pre_attn_scalar`, soft-capped attention
and final logits, sliding-window and global layers alternating, embeddings scaled by sqrt(hidden)."""

from __future__ import annotations

import torch

from splitfuse.models.base import add_norm
from splitfuse.models.llama import LlamaForCausalLM
from splitfuse.parallel.layers import vocab_embedding

_GEMMA_NORM_OFFSET = 1.0  # Gemma's RMSNorm scales by (1 + weight)


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Tensor parallel as Llama; the sandwich norms are replicated and run after the all-reduce of
    the o and down projections, on the whole sums."""

    supports_tensor_parallel = True
    layer_weights = {
        **LlamaForCausalLM.layer_weights,
        "post_attention_layernorm.weight": "post_attn_norm.weight",  # Llama's post_norm, renamed
        "pre_feedforward_layernorm.weight": "pre_ff_norm.weight",
        "post_feedforward_layernorm.weight": "post_ff_norm.weight",
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.attn_softcap = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"Gemma2ForCausalLM: config field hidden_activation={act!r} is not supported; "
                             "expected 'gelu_pytorch_tanh' or 'gelu'")
        self.gelu_approximate = "tanh" if act == "gelu_pytorch_tanh" else "none"
        # HF multiplies by sqrt(hidden) rounded to the model's dtype (33.9375 in bf16 for 1152, not 33.94)
        self.embed_scale = torch.tensor(self.hidden_size ** 0.5).to(device=backend.device, dtype=dtype)

    def _sliding_windows(self, config) -> list[int | None]:
        if getattr(config, "layer_types", None) or getattr(config, "sliding_window", None) is None:
            return super()._sliding_windows(config)
        # configs written before layer_types: even layers (0, 2, ...) slide, odd ones are global
        return [config.sliding_window if i % 2 == 0 else None for i in range(self.num_layers)]

    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        ops, w = self.backend, self.weights
        hidden = vocab_embedding(ops, self.shard, input_ids, w["embed_tokens.weight"], self.vocab_size)
        hidden = hidden * self.embed_scale
        residual = None
        for i in range(self.num_layers):
            p = f"layers.{i}."
            x, residual = add_norm(self.norm, p + "input_norm", hidden, residual)
            q, k, v = self.project_qkv(p, x)
            attn = ops.rotary_attention(q, k, v, positions, self.cos_sin, kv_cache[i], meta, self.scale,
                                        self.sliding_windows[i], self.attn_softcap)
            attn = self.shard.all_reduce(ops.linear(attn.reshape(attn.shape[0], -1), w[p + "o.weight"]))
            x, residual = self.norm(p + "pre_ff_norm", self.norm(p + "post_attn_norm", attn), residual)
            hidden = self.norm(p + "post_ff_norm", self.shard.all_reduce(self.mlp(i, x)))
        hidden, _ = self.norm("norm", hidden, residual)
        return hidden

    def norm(self, name: str, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Gemma's RMSNorm `name` of x (or of x + residual, with the sum): scales by 1 + weight."""
        return self.backend.rms_norm(x, self.weights[name + ".weight"], self.eps, residual, _GEMMA_NORM_OFFSET)

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        ops, p = self.backend, f"layers.{layer}."
        gate_up = ops.linear(x, self.weights[p + "gate_up.weight"])
        return ops.linear(ops.gelu_and_mul(gate_up, self.gelu_approximate), self.weights[p + "down.weight"])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().logits(hidden)
        if logits is None or self.final_softcap is None:  # None: a rank other than 0
            return logits
        return torch.tanh(logits / self.final_softcap) * self.final_softcap
