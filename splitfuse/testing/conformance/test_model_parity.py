"""The whole pipeline on the backend under test against Hugging Face transformers (fp32, cpu) on a
tiny random-weight model of the architecture under test: the same greedy tokens, log-probabilities
close, with prompts split over many steps, small KV blocks and a cache small enough to force
preemption; every KV block free afterwards.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import splitfuse
from splitfuse.testing.parity import hf_greedy, mismatch

FULL = pytest.mark.splitfuse_full  # left out by --splitfuse-quick

# name -> (prompt lengths, new tokens, engine settings)
RUNS = {
    # prompts split over dozens of 5-token steps, sharing them with decodes; 4-token KV blocks
    "chunked": ((1, 2, 7, 33, 70), 6, dict(token_budget=5, kv_block_size=4)),
    "one-step-prompts": ((1, 2, 7, 33, 70), 6, dict(kv_block_size=16)),
    # 40 blocks of 4 admit three of these prompts, which then outgrow the cache while decoding
    "preemption": ((33, 40, 47, 54), 16, dict(token_budget=32, kv_block_size=4, num_kv_blocks=40)),
    # small enough for the Triton interpreter: the 11-token prompt is chunked and shares steps with decodes
    "quick": ((1, 5, 11), 4, dict(token_budget=8, kv_block_size=4)),
}

# of the 30 tokens HF generates for the one-step prompts (the tiny llama: 23, qwen2: 8)
MIN_DISTINCT_TOKENS = 6
# Log-probabilities of the generated tokens and the top alternatives against HF's: on the cpu backend
# they agree within 1e-6 (llama) to 5e-5 (GPT-2, whose gelu_new formula differs from torch's tanh
# GELU in the last bits); 1e-3 leaves room for another backend's summation order and still catches
# a wrong activation approximation (4e-3).
LOGPROB_ATOL = 1e-3
NUM_TOP = 5


def _prompts(lengths, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]  # ids 0-2 are pad/bos/eos


@pytest.fixture(scope="module")
def checkpoint(target, tmp_path_factory):
    """A tiny random-weight checkpoint of the architecture under test, built once."""
    from splitfuse.testing.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("conformance-model"), target.arch, **target.arch_config)


@pytest.fixture(scope="module")
def hf_reference(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokens(hf_reference):
    """HF's greedy continuation of a prompt, computed once per prompt and length."""
    cache: dict[tuple, list[int]] = {}

    def get(prompt: list[int], new_tokens: int) -> list[int]:
        key = (tuple(prompt), new_tokens)
        if key not in cache:
            cache[key] = hf_greedy(hf_reference, prompt, new_tokens)
        return cache[key]

    return get


def test_architecture_is_registered(checkpoint):
    from splitfuse.models import supported_architectures

    [arch] = json.loads((checkpoint / "config.json").read_text())["architectures"]
    registered = supported_architectures()
    assert arch in registered, (
        f"no installed plugin registers the architecture {arch!r} (is its package installed?); "
        f"registered: {', '.join(registered)}")


def test_tiny_checkpoint_tells_tokens_apart(target, hf_tokens):
    """Parity with a model that says nearly the same token whatever it reads would prove little."""
    lengths, new_tokens, _ = RUNS["one-step-prompts"]
    generated = [t for p in _prompts(lengths) for t in hf_tokens(p, new_tokens)]
    assert len(set(generated)) >= MIN_DISTINCT_TOKENS, (
        f"the tiny {target.arch} checkpoint is nearly constant: HF's greedy output has only "
        f"{len(set(generated))} distinct tokens in {len(generated)}; spread its logits with "
        "--splitfuse-arch-config, e.g. '{\"initializer_range\": 0.2}'")


@pytest.mark.parametrize("run", [pytest.param(name, marks=[] if name == "quick" else FULL) for name in RUNS])
def test_greedy_matches_hf(target, backend, checkpoint, hf_reference, hf_tokens, run):
    if torch.float32 not in backend.dtypes:
        pytest.skip(f"backend {backend.name!r} declares no float32, so it cannot match HF's fp32 tokens exactly")
    lengths, new_tokens, settings = RUNS[run]
    prompts = _prompts(lengths)
    pipe = splitfuse.pipeline(checkpoint, backend=target.backend, dtype="float32", **settings)
    try:
        responses = pipe(prompts, max_new_tokens=new_tokens, temperature=0.0, logprobs=NUM_TOP)
        problems = [mismatch(hf_reference, p, r.token_ids, hf_tokens(p, new_tokens)) for p, r in zip(prompts, responses)]
        assert [p for p in problems if p] == [], f"{target.arch} on {target.backend} differs from HF"
        problems = [_logprob_mismatch(hf_reference, p, r) for p, r in zip(prompts, responses)]
        assert [p for p in problems if p] == [], f"{target.arch} on {target.backend}: log-probs differ from HF"
        blocks = pipe.engine.blocks
        assert blocks.num_free == blocks.num_blocks, f"{blocks.num_blocks - blocks.num_free} KV blocks still held"
        if run == "preemption":
            assert pipe.engine.scheduler.num_preemptions > 0, "the cache was meant to force a preemption"
    finally:
        pipe.close()


@torch.no_grad()
def _logprob_mismatch(hf_model, prompt: list[int], response) -> str | None:
    """None when every generated token's log-prob and its top alternatives' match HF's (fed the same
    tokens) within LOGPROB_ATOL, else where and by how much they differ."""
    tokens = response.token_ids
    logits = hf_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:].float()
    expected = torch.log_softmax(logits, dim=-1)  # row i predicts generated token i
    for i, lp in enumerate(response.logprobs):
        for token, value in [(lp.token_id, lp.logprob), *lp.top.items()]:
            diff = abs(expected[i, token].item() - value)
            if diff > LOGPROB_ATOL:
                return (f"prompt of {len(prompt)} tokens, generated token {i}: log-prob of token {token} is "
                        f"{value:.6f}, HF {expected[i, token].item():.6f} (differs by {diff:.2e})")
    return None
