"""Greedy output equals HF transformers `generate` token for token (fp32, cpu backend)."""

from __future__ import annotations

import pytest

import splitfuse
from splitfuse.testing.parity import NEW_TOKENS, check_all, check_preemption, hf_greedy, make_prompts


@pytest.fixture(scope="module")
def references(tiny_model_dir, hf_model):
    """HF greedy continuations per model variant, computed once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = hf_model(tiny_model_dir(name))
            cache[name] = [hf_greedy(model, p, NEW_TOKENS) for p in make_prompts()]
        return cache[name]

    return get


ENGINE_SETTINGS = {
    "budget5-block4": dict(token_budget=5, kv_block_size=4),
    "budget5-block16": dict(token_budget=5, kv_block_size=16),
    "default-budget": dict(kv_block_size=16),
}


@pytest.mark.parametrize("settings", list(ENGINE_SETTINGS), ids=list(ENGINE_SETTINGS))
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_greedy_matches_hf(name, settings, tiny_model_dir, hf_model, references):
    check_all(name, ENGINE_SETTINGS[settings], tiny_model_dir, hf_model, references)


def test_llama3_rope_scaling_and_tied_embeddings_match_hf(tiny_model_dir, hf_model, references):
    check_all("llama3", ENGINE_SETTINGS["budget5-block4"], tiny_model_dir, hf_model, references)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_preemption_recomputes_to_the_same_tokens(name, tiny_model_dir, hf_model):
    """40 blocks of 4 tokens admit three of these prompts, which then outgrow the cache while
    decoding 40 tokens each: the newest is preempted and recomputed, and the output is unchanged."""
    check_preemption(name, tiny_model_dir, hf_model)


def test_sharded_checkpoint_loads_the_same(tmp_path, tiny_model_dir):
    from splitfuse.testing.tiny_model import make_tiny_model

    sharded = make_tiny_model(tmp_path / "sharded", "qwen2", max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    prompts = make_prompts()[:4]
    whole = splitfuse.pipeline(tiny_model_dir("qwen2"), backend="cpu")(prompts, max_new_tokens=6, temperature=0)
    split = splitfuse.pipeline(sharded, backend="cpu")(prompts, max_new_tokens=6, temperature=0)
    assert [r.token_ids for r in split] == [r.token_ids for r in whole]


def test_alone_equals_crowded(tiny_model_dir):
    """A request's tokens do not depend on what shares its batch (greedy and seeded sampling)."""
    pipe = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", token_budget=16, kv_block_size=4)
    prompts = make_prompts(seed=1)
    target = prompts[3]
    for params in (dict(temperature=0.0), dict(temperature=0.9, top_k=40, top_p=0.9, seed=1234)):
        alone = pipe([target], max_new_tokens=12, **params)[0].token_ids
        crowded = pipe(prompts, max_new_tokens=12, **params)[3].token_ids
        assert alone == crowded
