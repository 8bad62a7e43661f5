"""Greedy output equals HF transformers `generate` token for token (fp32, cpu backend)."""

from __future__ import annotations

import random

import pytest

import splitfuse
from splitfuse.testing.parity import hf_greedy, mismatch

PROMPT_LENGTHS = [1, 2, 7, 33, 64, 129, 200]
NEW_TOKENS = 8


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids 0-2 are pad/bos/eos: random prompts avoid them so EOS only comes from the model.
    return [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENGTHS]


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


def check_all(name, settings, tiny_model_dir, hf_model, references, prompts=None, new_tokens=NEW_TOKENS):
    path = tiny_model_dir(name)
    pipe = splitfuse.pipeline(path, backend="cpu", **settings)
    prompts = prompts or make_prompts()
    expected = references(name) if references else [hf_greedy(hf_model(path), p, new_tokens) for p in prompts]
    responses = pipe(prompts, max_new_tokens=new_tokens, temperature=0.0)
    problems = [mismatch(hf_model(path), p, r.token_ids, ref) for p, r, ref in zip(prompts, responses, expected)]
    assert [p for p in problems if p] == []
    assert pipe.engine.blocks.num_free == pipe.engine.blocks.num_blocks
    return pipe


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
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (33, 40, 47, 54)]
    settings = dict(token_budget=32, kv_block_size=4, num_kv_blocks=40)
    pipe = check_all(name, settings, tiny_model_dir, hf_model, None, prompts, new_tokens=40)
    assert pipe.engine.scheduler.num_preemptions > 0


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
