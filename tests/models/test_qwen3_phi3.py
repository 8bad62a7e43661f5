"""Qwen3 (per-head q/k RMSNorm) and Phi-3 (fused checkpoint matrices, partial rotary, longrope):
greedy output equals HF transformers `generate` token for token (fp32, cpu backend), with prompts
chunked over many steps, 4-token KV blocks, and a cache small enough to force preemption."""

from __future__ import annotations

import pytest

from splitfuse.testing.parity import check_all, check_preemption


# longrope with an original context of 64: of the prompts (1-200 tokens) those up to 64 tokens
# rotate with the short factors and those over it with the long ones; the 64-token prompt grows
# past 64 at its first generated token, where HF drops its cache and recomputes every token with
# the long factors (so must the engine)
LONGROPE = {
    "original_max_position_embeddings": 64,
    "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                        "short_factor": [1.0, 1.3, 2.0, 3.1], "long_factor": [1.5, 2.5, 4.0, 9.0]},
}

VARIANTS = {
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    # partial rotary: 8 of each head's 16 features
    "phi3-longrope": ("phi3", LONGROPE),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_matches_hf_with_chunked_prompts(name, model_dir, hf_model):
    # prompts of 1-200 tokens together, a 5-token budget (long prompts take dozens of steps)
    check_all(name, dict(token_budget=5, kv_block_size=4), model_dir, hf_model, None)


@pytest.mark.parametrize("name", ["qwen3", "phi3-longrope"])
def test_preemption_recomputes_to_the_same_tokens(name, model_dir, hf_model):
    # with longrope these prompts (33-54 tokens) cross the original context of 64 while decoding
    # 40 tokens, and the preempted one is recomputed from its prompt plus what it generated
    check_preemption(name, model_dir, hf_model)
