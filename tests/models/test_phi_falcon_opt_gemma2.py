"""Phi-2, Falcon (7B, 40B and 11B layouts), OPT (pre- and post-LN) and Gemma 2: greedy output
equals HF transformers `generate` token for token (fp32, cpu backend), with prompts chunked over
many steps, 4-token KV blocks, and a cache small enough to force preemption."""

from __future__ import annotations

import pytest
import torch

import splitfuse
from splitfuse.testing.parity import NEW_TOKENS, check_all, check_preemption, hf_greedy, make_prompts
from splitfuse.testing.tiny_model import make_tiny_model

# name -> (arch, config overrides); each checks one layout HF distinguishes
VARIANTS = {
    # partial rotary (half of each head), parallel attention + MLP, gelu_new, biases, lm_head bias
    "phi": ("phi", {}),
    # Falcon 7B: multi-query (one KV head), one LayerNorm for attention and MLP, tied lm_head
    "falcon-7b": ("falcon", {"multi_query": True, "parallel_attn": True, "tie_word_embeddings": True}),
    # Falcon 40B/180B: grouped KV heads interleaved in query_key_value, ln_attn + ln_mlp, biases
    "falcon-40b": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "bias": True}),
    # Falcon2 11B: the new architecture with one LayerNorm for attention and MLP
    "falcon-11b": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1}),
    # OPT 125m-style: pre-LN, tied lm_head
    "opt": ("opt", {"tie_word_embeddings": True}),
    # OPT 350m-style: post-LN, no final LayerNorm, embeddings of 32 projected to the hidden 64
    "opt-350m": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32, "tie_word_embeddings": True}),
    # a window shorter than most prompts on layer 0; attention scale from query_pre_attn_scalar
    # (not head_dim); a low attention softcap so that it bends the scores
    "gemma2": ("gemma2", {"sliding_window": 24, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 10.0,
                          "final_logit_softcapping": 5.0, "tie_word_embeddings": True}),
}


def check_logprobs(pipe, hf_model, prompt: list[int], new_tokens: int = 3) -> None:
    """Log-probabilities of the greedy tokens equal HF's (finer than the tokens themselves)."""
    out = pipe([prompt], max_new_tokens=new_tokens, temperature=0.0, logprobs=1)[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1: -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    want = [expected[i, t].item() for i, t in enumerate(out.token_ids)]
    assert [lp.logprob for lp in out.logprobs] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_matches_hf_with_chunked_prompts(name, model_dir, hf_model):
    expected = [hf_greedy(hf_model(model_dir(name)), p, NEW_TOKENS) for p in make_prompts()]
    # matching a model that says nearly the same token whatever it reads would prove little
    assert len({t for tokens in expected for t in tokens}) >= 8
    # prompts of 1-200 tokens together, a 5-token budget (long prompts take dozens of steps)
    pipe = check_all(name, dict(token_budget=5, kv_block_size=4), model_dir, hf_model, lambda _: expected)
    check_logprobs(pipe, hf_model(model_dir(name)), make_prompts()[4])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_preemption_recomputes_to_the_same_tokens(name, model_dir, hf_model):
    check_preemption(name, model_dir, hf_model)


def test_phi_qk_layernorm_matches_hf(tmp_path, hf_model):
    path = str(make_tiny_model(tmp_path, "phi", qk_layernorm=True, tie_word_embeddings=True))
    pipe = check_all("phi-qk", dict(token_budget=5, kv_block_size=4), lambda _: path, hf_model, None,
                     prompts=make_prompts()[:5])
    check_logprobs(pipe, hf_model(path), make_prompts()[4])


def test_gemma2_final_softcap_is_applied(model_dir, hf_model):
    """Soft-capping keeps the argmax, so greedy tokens cannot show it; log-probabilities do."""
    path = model_dir("gemma2")
    prompt = make_prompts()[3]
    model = hf_model(path)
    with torch.no_grad():
        assert model(torch.tensor([prompt])).logits.abs().max() <= 5.0  # the cap is on in HF
    check_logprobs(splitfuse.pipeline(path, backend="cpu", kv_block_size=4), model, prompt)


def test_gemma2_sliding_window_matters(model_dir, hf_model):
    """The window really cuts: without it HF continues a prompt longer than the window differently."""
    from transformers import AutoModelForCausalLM

    path = model_dir("gemma2")
    prompt = make_prompts()[5]  # 129 tokens, window 24
    no_window = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, sliding_window=4096).eval()
    ours = splitfuse.pipeline(path, backend="cpu", token_budget=16, kv_block_size=4)(
        [prompt], max_new_tokens=8, temperature=0.0)[0].token_ids
    assert ours == hf_greedy(hf_model(path), prompt, 8)
    assert ours != hf_greedy(no_window, prompt, 8)


def test_falcon_alibi_is_refused_by_name(tmp_path):
    path = make_tiny_model(tmp_path, "falcon", alibi=True)
    with pytest.raises(ValueError, match="alibi=True.*not supported"):
        splitfuse.pipeline(path, backend="cpu")


def test_gemma2_config_without_layer_types_alternates_from_layer_0():
    """Configs written before `layer_types` existed: even layers slide, odd ones see everything."""
    from transformers import Gemma2Config

    from splitfuse.backends.cpu import CpuBackend
    from splitfuse.models.gemma2 import Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=24)
    config.layer_types = None
    model = Gemma2ForCausalLM(config, CpuBackend(), torch.float32, 64)
    assert model.sliding_windows == [24, None, 24, None]
