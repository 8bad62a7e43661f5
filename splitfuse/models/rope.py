"""Rotary embedding tables: [max_positions, rotary_dim] = cat(cos, sin), the layout every backend's
rotary op reads. Built exactly as Hugging Face transformers builds them, so fp32 matches bit for bit."""

from __future__ import annotations

import torch


def build_cos_sin_cache(
    inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[max_positions, rotary_dim] = cat(cos, sin), computed as HF's LlamaRotaryEmbedding does."""
    # position * inv_freq in float32, one product per element exactly like HF, so fp32 is bit-identical
    freqs = torch.arange(max_positions, device=inv_freq.device).float()[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1).to(dtype)


def rope_cos_sin(config, head_dim: int, max_positions: int, dtype: torch.dtype, device,
                 rotary_dim: int | None = None) -> torch.Tensor:
    """[max_positions, rotary_dim] cos|sin table built with transformers' own rope functions, so
    every rope scaling type it knows (llama3, linear, yarn, ...) gives HF's exact frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary_dim = rotary_dim or head_dim
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    cache = build_cos_sin_cache(inv_freq, max_positions, scaling)
    return cache.to(device=device, dtype=dtype)


def longrope_cos_sin(config, max_positions: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, int]:
    """Phi-3's longrope: [2 * max_positions, rotary_dim], the short-factor table then the long-factor
    one, and the original context length after which a sequence rotates with the long factors."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS["longrope"]
    long_after = int(config.rope_parameters["original_max_position_embeddings"])
    short, scaling = init(config, torch.device("cpu"))
    long, _ = init(config, torch.device("cpu"), seq_len=long_after + 1)  # as HF computes it
    tables = [build_cos_sin_cache(f, max_positions, scaling) for f in (short, long)]
    return torch.cat(tables).to(device=device, dtype=dtype), long_after
