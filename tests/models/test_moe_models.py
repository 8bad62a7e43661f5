"""Mixtral and Qwen2-MoE: greedy output equals HF transformers `generate` token for token (fp32,
cpu backend), with prompts chunked over many steps, 4-token KV blocks, and a cache small enough
to force preemption."""

from __future__ import annotations

import pytest

from splitfuse.cli import main
from splitfuse.testing.parity import check_all, check_preemption, make_prompts

# name -> (arch, config overrides); 4 experts, top-2 unless said otherwise (TINY_DEFAULTS)
VARIANTS = {
    # a window shorter than the long prompts: Mixtral keeps Mistral's sliding window
    "mixtral": ("mixtral", {"sliding_window": 24}),
    # layer 0 sparse (routed experts + sigmoid-gated shared expert), layer 1 dense via mlp_only_layers;
    # top-k weights not renormalised (norm_topk_prob false, Qwen1.5-MoE's setting)
    "qwen2_moe": ("qwen2_moe", {"mlp_only_layers": [1]}),
    # decoder_sparse_step 2: layer 0 dense, layer 1 sparse; top-3 of 4, renormalised
    "qwen2_moe-step2": ("qwen2_moe", {"decoder_sparse_step": 2, "num_experts_per_tok": 3,
                                      "norm_topk_prob": True}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_matches_hf_with_chunked_prompts(name, model_dir, hf_model):
    # prompts of 1-200 tokens together, a 5-token budget (long prompts take dozens of steps)
    prompts = None if name != "qwen2_moe-step2" else make_prompts()[:5]
    check_all(name, dict(token_budget=5, kv_block_size=4), model_dir, hf_model, None, prompts)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_preemption_recomputes_to_the_same_tokens(name, model_dir, hf_model):
    check_preemption(name, model_dir, hf_model)


def test_models_command_lists_the_new_architectures(capsys):
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    for arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"):
        assert arch in listed
