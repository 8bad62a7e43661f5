"""Seeded sampling end to end: a request's tokens depend on its seed alone, not on the backend, the
batch it shares, preemption, or anything a backend or engine remembers from earlier requests."""

from __future__ import annotations

import pytest

import splitfuse
from splitfuse.config import SamplingParams

NEW_TOKENS = 16
PROMPTS = [[5, 17, 99, 250], [7] * 9, [300, 11], [42, 43, 44, 45, 46, 47]]
SEEDS = [1, 2**63 - 1, 12345, 2**64 - 3]


def sampled(seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_new_tokens=NEW_TOKENS, ignore_eos=True, **kw)


def generate(engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """Generated token ids of each (prompt, params), all queued at once on one engine."""
    ids = [engine.add_request(prompt, params) for prompt, params in jobs]
    tokens = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[rid] for rid in ids]


def engine(path, backend="cpu", **kw):
    return splitfuse.pipeline(path, backend=backend, dtype="float32", **kw).engine


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("llama")  # 2 layers, hidden 64, vocab 512


@pytest.fixture(scope="module")
def seeded_tokens(model_path):
    """The four seeded requests sampled together on the cpu backend."""
    return generate(engine(model_path), [(p, sampled(s)) for p, s in zip(PROMPTS, SEEDS)])


def test_seeded_requests_sample_rather_than_take_the_argmax(model_path, seeded_tokens):
    greedy = generate(engine(model_path), [(p, sampled(None, top_k=1)) for p in PROMPTS])
    assert all(len(t) == NEW_TOKENS for t in seeded_tokens)
    assert seeded_tokens != greedy
    assert len({tuple(t) for t in seeded_tokens}) == len(PROMPTS)


@pytest.mark.slow
# the interpreter turns loop bounds into ints through a numpy conversion it deprecates
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_cpu_and_cuda_backends_sample_the_same_tokens(model_path, seeded_tokens):
    pytest.importorskip("splitfuse.backends.triton.sampling")
    cuda = engine(model_path, backend="cuda", kv_block_size=4)
    assert cuda.backend.name == "cuda"
    assert generate(cuda, [(p, sampled(s)) for p, s in zip(PROMPTS, SEEDS)]) == seeded_tokens


def test_a_seeded_request_samples_the_same_alone_and_in_a_crowded_batch(model_path, seeded_tokens):
    alone = generate(engine(model_path), [(PROMPTS[2], sampled(SEEDS[2]))])[0]
    assert alone == seeded_tokens[2]
    # crowded: more requests (greedy, unseeded, other settings), a small token budget that chunks
    # prompts and mixes them with decodes, another position in the batch
    crowd = [(PROMPTS[0], sampled(None)), ([9] * 13, sampled(None, top_k=1)), (PROMPTS[2], sampled(SEEDS[2])),
             ([3, 4], SamplingParams(temperature=0.7, top_k=20, seed=5, max_new_tokens=30, ignore_eos=True))]
    assert generate(engine(model_path, token_budget=6, kv_block_size=4), crowd)[2] == alone


def test_a_seeded_request_samples_the_same_after_preemption(model_path, seeded_tokens):
    # 4 requests of up to 25 tokens in 4-token blocks, 12 blocks: decodes run out of KV and the
    # most recent requests are preempted and recomputed
    small = engine(model_path, kv_block_size=4, num_kv_blocks=12)
    assert generate(small, [(p, sampled(s)) for p, s in zip(PROMPTS, SEEDS)]) == seeded_tokens
    assert small.scheduler.num_preemptions > 0


def test_engines_and_backends_keep_no_per_request_state(model_path, seeded_tokens):
    # the same engine again (its backend has sampled before) and a fresh one: same seeds, same tokens
    first = engine(model_path)
    jobs = [(p, sampled(s)) for p, s in zip(PROMPTS, SEEDS)]
    assert generate(first, jobs) == generate(first, jobs[::-1])[::-1] == seeded_tokens
    assert generate(engine(model_path), jobs) == seeded_tokens


def test_every_sampled_request_has_a_seed_and_counts_its_draws(model_path):
    eng = engine(model_path)
    seeded = eng.add_request(PROMPTS[0], sampled(7))
    unseeded = eng.add_request(PROMPTS[1], sampled(None))
    greedy = eng.add_request(PROMPTS[2], sampled(3, top_k=1))
    seqs = {rid: eng.requests[rid] for rid in (seeded, unseeded, greedy)}
    assert seqs[seeded].seed == 7 and seqs[unseeded].seed is not None and seqs[greedy].seed is None
    assert 0 <= seqs[unseeded].seed < 2**63
    while eng.has_unfinished():
        eng.step()
    assert [s.num_draws for s in seqs.values()] == [NEW_TOKENS] * 3
