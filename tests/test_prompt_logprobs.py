"""prompt_logprobs=N: every prompt token's log-probability and top N alternatives, equal to HF's fp32
per-position log-softmax, when prompts are split over several steps and with the prefix cache on."""

from __future__ import annotations

import random

import pytest
import torch

import splitfuse

TOL = 1e-4


def prompt(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, 512) for _ in range(n)]


def hf_prompt_logprobs(model, ids: list[int], num_top: int):
    """Per prompt token 1.. : (its log-probability, top num_top (ids, values)) from HF in fp32."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    chosen = logprobs[:-1].gather(1, torch.tensor(ids[1:]).view(-1, 1)).squeeze(1)
    top = logprobs[:-1].topk(num_top, dim=-1)
    return chosen.tolist(), top.indices.tolist(), top.values.tolist()


def assert_matches_hf(entries, model, ids: list[int], num_top: int) -> None:
    assert len(entries) == len(ids) and entries[0] is None
    chosen, top_ids, top_values = hf_prompt_logprobs(model, ids, num_top)
    assert [e.token_id for e in entries[1:]] == ids[1:]
    assert [e.logprob for e in entries[1:]] == pytest.approx(chosen, abs=TOL)
    for entry, want_ids, want_values in zip(entries[1:], top_ids, top_values):
        assert list(entry.top) == want_ids
        assert list(entry.top.values()) == pytest.approx(want_values, abs=TOL)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def pipe(model_dir):
    # an 8-token budget splits every prompt here over several steps, fused with other prompts' chunks
    with splitfuse.pipeline(model_dir, backend="cpu", token_budget=8, kv_block_size=4) as p:
        yield p


def test_prompts_split_over_steps_match_hf(pipe, model_dir, hf_model):
    prompts = [prompt(n, seed) for seed, n in enumerate((23, 5, 37, 2))]
    steps_before = pipe.engine.stats().steps
    responses = pipe(prompts, prompt_logprobs=3, max_new_tokens=2, temperature=0.0)
    assert pipe.engine.stats().steps - steps_before > 37 // 8  # the longest prompt alone needs 5 steps
    for ids, response in zip(prompts, responses):
        assert_matches_hf(response.prompt_logprobs, hf_model(model_dir), ids, num_top=3)
        assert response.generated_length == 2


def test_zero_alternatives_and_one_token_prompts(pipe, model_dir, hf_model):
    ids = prompt(11, 40)
    long, single = pipe([ids, [7]], prompt_logprobs=0, max_new_tokens=1, temperature=0.0)
    chosen, _, _ = hf_prompt_logprobs(hf_model(model_dir), ids, 1)
    assert [e.logprob for e in long.prompt_logprobs[1:]] == pytest.approx(chosen, abs=TOL)
    assert all(e.top == {} for e in long.prompt_logprobs[1:])
    assert single.prompt_logprobs == [None]


def test_requests_that_do_not_ask_get_none(pipe):
    asked = pipe.engine.add_request(prompt(9, 1), pipe.sampling_params(prompt_logprobs=1, max_new_tokens=1))
    plain = pipe.engine.add_request(prompt(9, 2), pipe.sampling_params(max_new_tokens=1))
    firsts = {}
    while pipe.engine.has_unfinished():
        for out in pipe.engine.step():
            firsts.setdefault(out.request_id, out)
    assert len(firsts[asked].prompt_logprobs) == 9
    assert firsts[plain].prompt_logprobs is None


def test_prefix_cached_prompts_are_still_scored_and_still_fill_the_cache(model_dir, hf_model):
    shared = prompt(30, 3)
    with splitfuse.pipeline(model_dir, backend="cpu", token_budget=8, kv_block_size=4,
                            enable_prefix_caching=True) as pipe:
        warm = pipe(shared + [11, 12], max_new_tokens=1, temperature=0.0)[0]
        assert warm.num_cached_tokens == 0
        ids = shared + [21, 22, 23]
        scored = pipe(ids, prompt_logprobs=2, max_new_tokens=1, temperature=0.0)[0]
        assert scored.num_cached_tokens == 0  # computed again so every position is scored
        assert_matches_hf(scored.prompt_logprobs, hf_model(model_dir), ids, num_top=2)
        # the scored request's blocks went into the cache: a later request with its prefix reuses them
        again = pipe(ids + [5], max_new_tokens=1, temperature=0.0)[0]
        assert again.num_cached_tokens == 32


def test_preempted_requests_keep_their_scores(model_dir, hf_model):
    # 12 blocks of 4 tokens: three 14-token prompts growing to 18 tokens cannot all stay
    with splitfuse.pipeline(model_dir, backend="cpu", token_budget=16, kv_block_size=4, num_kv_blocks=12,
                            enable_prefix_caching=False) as pipe:
        prompts = [prompt(14, 50 + i) for i in range(3)]
        responses = pipe(prompts, prompt_logprobs=1, max_new_tokens=4, min_new_tokens=4, temperature=0.0)
        assert pipe.engine.stats().preemptions > 0
    for ids, response in zip(prompts, responses):
        assert_matches_hf(response.prompt_logprobs, hf_model(model_dir), ids, num_top=1)


def test_out_of_range_values_are_refused(pipe):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        pipe([1, 2, 3], prompt_logprobs=21)


def test_tensor_parallel_engines_refuse_prompt_logprobs(pipe, monkeypatch):
    from splitfuse.core.engine import AdmissionError

    monkeypatch.setattr(pipe.engine, "parallel", object())  # as an engine with worker ranks has
    with pytest.raises(AdmissionError, match="prompt_logprobs.*tensor_parallel_size"):
        pipe.engine.add_request([1, 2, 3], pipe.sampling_params(prompt_logprobs=1))
    assert not pipe.engine.has_unfinished()
