"""Phi-3: the Llama layout with fused qkv_proj and gate_up_proj in the checkpoint, partial rotary,
and `longrope` scaling (short and long frequency factors)."""

from __future__ import annotations

import torch

from splitfuse.backends.torch_ops import build_cos_sin_cache
from splitfuse.models.base import rope_cos_sin
from splitfuse.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama with fused checkpoint matrices; rope: default or longrope, optionally partial."""

    # longrope as transformers runs it: a sequence is rotated with the short factors while it holds
    # at most original_max_position_embeddings tokens and with the long ones after; when it grows
    # past that length HF drops its KV cache and recomputes every token with the long factors, so
    # the engine recomputes it here too (kv_stale_at_length). cos_sin then stacks both tables.

    _RENAMED = {
        **LlamaForCausalLM._RENAMED,
        "self_attn.qkv_proj.weight": "qkv.weight", "mlp.gate_up_proj.weight": "gate_up.weight",
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        params = getattr(config, "rope_parameters", None) or {}
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        rotary_dim = int(self.head_dim * factor)
        self.rotary_dim = rotary_dim if rotary_dim < self.head_dim else None
        self.long_after: int | None = None  # original_max_position_embeddings under longrope
        if params.get("rope_type") == "longrope":
            self.cos_sin = self._longrope_tables(config, params, dtype, backend.device)
        elif self.rotary_dim is not None:
            self.cos_sin = rope_cos_sin(config, self.head_dim, max_model_len, dtype, backend.device, self.rotary_dim)

    def _longrope_tables(self, config, params: dict, dtype, device) -> torch.Tensor:
        """[2 * max_model_len, rotary_dim]: the short-factor table, then the long-factor one."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS["longrope"]
        self.long_after = int(params["original_max_position_embeddings"])
        self.kv_stale_at_length = self.long_after + 1
        short, scaling = init(config, torch.device("cpu"))
        long, _ = init(config, torch.device("cpu"), seq_len=self.long_after + 1)  # as HF computes it
        tables = [build_cos_sin_cache(f, self.max_model_len, scaling) for f in (short, long)]
        return torch.cat(tables).to(device=device, dtype=dtype)

    def rope_positions(self, positions: torch.Tensor, meta) -> torch.Tensor:
        """Rows of the long-factor table for tokens of sequences longer than the original context."""
        if self.long_after is None:
            return positions
        if meta.seq_lens is None:  # metadata built without sequence lengths: decide by position
            length = positions + 1
        else:
            length = meta.seq_lens.to(positions.device)[meta.token_seq]
        return positions + (length > self.long_after).long() * self.max_model_len
