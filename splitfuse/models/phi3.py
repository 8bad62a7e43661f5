"""Phi-3: the Llama layout with fused qkv_proj and gate_up_proj in the checkpoint, partial rotary,
and `longrope` scaling (short and long frequency factors)."""

from __future__ import annotations

import torch

from splitfuse.models.llama import LlamaForCausalLM
from splitfuse.models.rope import longrope_cos_sin, rope_cos_sin
from splitfuse.models.weight_tables import FUSED_QKV, GATE_UP, Weight


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama with fused checkpoint matrices; rope: default or longrope, optionally partial. Tensor
    parallel as Llama: each rank reads its rows of q, k and v (and of gate and up) from the fused
    matrices, so they split as Llama's separate ones do."""

    supports_tensor_parallel = True

    # longrope as transformers runs it: a sequence is rotated with the short factors while it holds
    # at most original_max_position_embeddings tokens and with the long ones after; when it grows
    # past that length HF drops its KV cache and recomputes every token with the long factors, so
    # the engine recomputes it here too (recompute_kv_at_length). cos_sin then stacks both tables.

    layer_weights = {
        **LlamaForCausalLM.layer_weights,
        "self_attn.qkv_proj.weight": Weight("qkv.weight", split=FUSED_QKV),  # already fused in the checkpoint
        "mlp.gate_up_proj.weight": Weight("gate_up.weight", split=GATE_UP),
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        params = getattr(config, "rope_parameters", None) or {}
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        rotary_dim = int(self.head_dim * factor)
        self.rotary_dim = rotary_dim if rotary_dim < self.head_dim else None
        self.long_after: int | None = None  # original_max_position_embeddings under longrope
        if params.get("rope_type") == "longrope":
            self.cos_sin, self.long_after = longrope_cos_sin(config, max_model_len, dtype, backend.device)
        elif self.rotary_dim is not None:
            self.cos_sin = rope_cos_sin(config, self.head_dim, max_model_len, dtype, backend.device, self.rotary_dim)

    def recompute_kv_at_length(self) -> int | None:
        """Past the original context longrope rotates with the long factors: every cached K changes."""
        return None if self.long_after is None else self.long_after + 1

    def rope_positions(self, positions: torch.Tensor, meta) -> torch.Tensor:
        """Rows of the long-factor table for tokens of sequences longer than the original context."""
        if self.long_after is None:
            return positions
        if meta.seq_lens is None:  # metadata built without sequence lengths: decide by position
            length = positions + 1
        else:
            length = meta.seq_lens.to(positions.device)[meta.token_seq]
        return positions + (length > self.long_after).long() * self.max_model_len
