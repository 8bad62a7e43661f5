"""Qwen3: the Llama layout plus an RMSNorm over each query and key head before the rotary."""

from __future__ import annotations

import torch

from splitfuse.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Per-head q/k RMSNorm (weights [D], shared by the heads); optional qkv bias. Tensor parallel as
    Llama: each rank norms its own heads, so the norm weights are replicated."""

    supports_tensor_parallel = True

    layer_weights = {
        **LlamaForCausalLM.layer_weights,
        "self_attn.q_norm.weight": "q_norm.weight",
        "self_attn.k_norm.weight": "k_norm.weight",
    }

    def project_qkv(self, prefix: str, x: torch.Tensor):
        q, k, v = super().project_qkv(prefix, x)
        ops, w, D = self.backend, self.weights, self.head_dim
        # every head is one row of a [T * heads, D] RMSNorm
        q = ops.rms_norm(q.reshape(-1, D), w[prefix + "q_norm.weight"], self.eps).view(q.shape)
        k = ops.rms_norm(k.reshape(-1, D), w[prefix + "k_norm.weight"], self.eps).view(k.shape)
        return q, k, v
