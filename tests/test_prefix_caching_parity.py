"""Prefix caching changes nothing a user sees but speed: tokens and log-probabilities equal those with
caching off and HF's, in every situation that shares blocks."""

from __future__ import annotations

import random

import pytest

import splitfuse
from splitfuse.config import SamplingParams
from splitfuse.testing.parity import hf_greedy, mismatch

BLOCK = 4
rng = random.Random(7)
SYSTEM = [rng.randrange(3, 512) for _ in range(42)]  # 42 = 10 full blocks of 4 and 2 tokens into the 11th


def suffix(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, 512) for _ in range(n)]


def make(model_dir, caching: bool, **settings):
    options = {"token_budget": 16, "kv_block_size": BLOCK, **settings}
    return splitfuse.pipeline(model_dir("llama"), backend="cpu", enable_prefix_caching=caching, **options)


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    return {caching: make(tiny_model_dir, caching) for caching in (True, False)}


def generate(pipe, prompts, **sampling):
    params = {"max_new_tokens": 8, "temperature": 0.0, "logprobs": 2, **sampling}
    return pipe(prompts, **params)


def assert_same_outputs(cached, uncached):
    for a, b in zip(cached, uncached, strict=True):
        assert a.token_ids == b.token_ids
        # the cached run attends over the prefix from the cache in another order of summation
        assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-4)


def assert_all_blocks_free(pipe):
    blocks = pipe.engine.blocks
    assert blocks.num_free == blocks.num_blocks, "KV blocks still held after every request finished"
    assert all(blocks.ref_count(b) == 0 for b in range(blocks.num_blocks))


def test_a_shared_system_prompt_is_computed_once_and_changes_no_output(pipes, tiny_model_dir, hf_model):
    prompts = [SYSTEM + suffix(n, seed) for seed, n in enumerate((3, 9, 1, 14))]
    warm = generate(pipes[True], [SYSTEM + suffix(5, 99)])  # puts the system prompt in the cache
    assert warm[0].num_cached_tokens == 0
    cached, uncached = generate(pipes[True], prompts), generate(pipes[False], prompts)
    assert_same_outputs(cached, uncached)
    # the system prompt ends 2 tokens into its 11th block: the 10 full blocks are shared
    assert [r.num_cached_tokens for r in cached] == [40, 40, 40, 40]
    assert [r.num_cached_tokens for r in uncached] == [0, 0, 0, 0]
    hf = hf_model(tiny_model_dir("llama"))
    for prompt, response in zip(prompts, cached):
        assert mismatch(hf, prompt, response.token_ids, hf_greedy(hf, prompt, 8)) is None
    assert_all_blocks_free(pipes[True])


def test_an_entirely_cached_prompt_computes_only_its_last_token(pipes):
    prompt = SYSTEM[:40]  # exactly 10 blocks
    first, again = generate(pipes[True], [prompt]), generate(pipes[True], [prompt])
    reference = generate(pipes[False], [prompt])
    assert again[0].num_cached_tokens == 36  # the last block is recomputed for the last token's logits
    assert_same_outputs(first, reference)
    assert_same_outputs(again, reference)


def test_many_requests_with_one_new_prefix_in_one_call_compute_it_once(tiny_model_dir):
    pipe = make(tiny_model_dir, True, token_budget=64)
    new_prefix = suffix(48, 1234)
    prompts = [new_prefix + suffix(3, seed) for seed in range(8)]
    before = pipe.engine.stats()
    responses = generate(pipe, prompts)
    after = pipe.engine.stats()
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 48 + 8 * 3
    assert after.prompt_tokens_cached - before.prompt_tokens_cached == 7 * 48
    assert_same_outputs(responses, generate(make(tiny_model_dir, False, token_budget=64), prompts))


def test_a_cache_too_small_for_the_working_set_evicts_and_stays_exact(tiny_model_dir):
    # 24 blocks of 4 = 96 tokens: four 40-token prefixes cannot all stay cached
    pipe = make(tiny_model_dir, True, num_kv_blocks=24)
    prefixes = [suffix(40, 500 + i) for i in range(4)]
    order = [0, 0, 1, 1, 2, 2, 3, 3, 0, 1]  # a repeat right away hits; 0 and 1 again come after evictions
    prompts = [prefixes[p] + suffix(5, i) for i, p in enumerate(order)]
    cached = [generate(pipe, [p])[0] for p in prompts]  # one at a time: each may evict another's prefix
    uncached = generate(make(tiny_model_dir, False, num_kv_blocks=24), prompts)
    assert pipe.engine.blocks.num_evictions > 0
    assert [r.num_cached_tokens for r in cached] == [0, 40] * 4 + [0, 0]
    assert_same_outputs(cached, uncached)
    assert_all_blocks_free(pipe)


def run_engine(engine, prompts, params, abort_after: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Drive the engine by hand; abort_after {index: step} aborts that request at that step."""
    ids = engine.add_requests([(p, params, f"r{i}") for i, p in enumerate(prompts)])
    tokens = {i: [] for i in range(len(ids))}
    step = 0
    while engine.has_unfinished():
        for index, when in (abort_after or {}).items():
            if when == step:
                engine.abort(ids[index])
        for out in engine.step():
            tokens[ids.index(out.request_id)] += out.new_token_ids
        step += 1
    return tokens


def test_preemption_and_abort_while_blocks_are_shared_lose_nothing(tiny_model_dir):
    # 20 blocks of 4 for six sharers of a 40-token prefix generating 16 each: decodes must preempt
    prompts = [SYSTEM[:40] + suffix(6, seed) for seed in range(6)]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    cached = make(tiny_model_dir, True, num_kv_blocks=20).engine
    uncached = make(tiny_model_dir, False, num_kv_blocks=20).engine
    got = run_engine(cached, prompts, params, abort_after={1: 6, 4: 9})
    want = run_engine(uncached, prompts, params)
    assert cached.stats().preemptions > 0 and cached.stats().prompt_tokens_cached > 0
    for index in (0, 2, 3, 5):
        assert got[index] == want[index]
    for index in (1, 4):  # aborted: what they got so far is a prefix of the full answer
        assert got[index] == want[index][: len(got[index])] and len(got[index]) < 16
    assert cached.blocks.num_free == cached.blocks.num_blocks
    assert all(cached.blocks.ref_count(b) == 0 for b in range(cached.blocks.num_blocks))


def test_seeded_sampling_draws_the_same_tokens_with_and_without_caching(pipes):
    prompts = [SYSTEM + suffix(4, 100 + seed) for seed in range(3)]
    sampling = {"temperature": 1.0, "top_p": 0.9, "seed": 11, "max_new_tokens": 12}
    generate(pipes[True], prompts[:1], **sampling)  # warm the cache
    cached, uncached = generate(pipes[True], prompts, **sampling), generate(pipes[False], prompts, **sampling)
    # the first prompt was sent before: its 11th block (2 system + 2 own tokens) is cached too
    assert [r.num_cached_tokens for r in cached] == [44, 40, 40]
    assert_same_outputs(cached, uncached)
    greedy = generate(pipes[False], prompts, max_new_tokens=12)
    assert [r.token_ids for r in cached] != [r.token_ids for r in greedy], "sampling must not be greedy here"


def test_the_cuda_kernels_give_the_same_tokens_with_and_without_caching(tiny_model_dir):
    """The cuda backend's Triton kernels (run by the interpreter here) read cached blocks the same way."""
    pytest.importorskip("triton")
    prompts = [SYSTEM[:21] + suffix(3, seed) for seed in range(2)]
    outputs = {}
    for caching in (True, False):
        pipe = splitfuse.pipeline(tiny_model_dir("llama"), backend="cuda", enable_prefix_caching=caching,
                                  token_budget=16, kv_block_size=BLOCK, num_kv_blocks=64)
        generate(pipe, [SYSTEM[:21] + [5]], max_new_tokens=2)
        outputs[caching] = generate(pipe, prompts, max_new_tokens=4)
    assert [r.num_cached_tokens for r in outputs[True]] == [20, 20]
    assert_same_outputs(outputs[True], outputs[False])
