"""Sampling: filters agree with HF's logits warpers, draws follow the filtered distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from splitfuse.config import SamplingParams, is_greedy
from splitfuse.core.philox import exponential, noise_offsets
from splitfuse.core.sampler import SamplingBatch, _filtered_probs, sample_tokens


def hf_probs(logits, temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                       (0.9, 20, 0.5), (1.0, 0, 0.05)])
def test_filters_match_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3
    ours = _filtered_probs(logits, temperature, top_k, top_p)
    torch.testing.assert_close(ours, hf_probs(logits, temperature, top_k, top_p))


def batch(rows, **kw):
    defaults = dict(temperatures=[1.0] * rows, top_ks=[0] * rows, top_ps=[1.0] * rows,
                    seeds=list(range(rows)), counters=[0] * rows, suppressed=[[]] * rows)
    defaults.update(kw)
    return SamplingBatch(**defaults)


def test_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    counts = torch.zeros(4)
    for draw in range(4000):
        counts[sample_tokens(logits, batch(1, seeds=[0], counters=[draw]))[0]] += 1
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)


def test_top_k_never_draws_outside_the_top_k():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    drawn = {int(sample_tokens(logits, batch(1, top_ks=[3], seeds=[0], counters=[draw]))[0]) for draw in range(300)}
    assert drawn <= allowed and len(drawn) == 3


def test_greedy_rows_take_the_argmax_and_suppressed_ids_are_never_picked():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    b = batch(2, temperatures=[0.0, 0.0], seeds=[None, None], suppressed=[[], [1]])
    assert sample_tokens(logits, b).tolist() == [1, 2]


def test_each_row_draws_from_its_own_seed_and_counter():
    logits = torch.zeros(3, 1000)  # uniform: any shared random state would show
    first = sample_tokens(logits, batch(3)).tolist()
    again = sample_tokens(logits, batch(3)).tolist()
    assert first == again  # same (seed, counter) per row, same draws: the sampler keeps no state
    alone = sample_tokens(logits[1:2], batch(1, seeds=[1])).tolist()
    assert alone == first[1:2]
    later = sample_tokens(logits, batch(3, counters=[1, 1, 1])).tolist()
    assert later != first  # the next draw of each seed is a fresh one


def test_noise_is_the_philox_exponential_race():
    # on uniform logits the exponential race picks the token with the smallest Exp(1) noise
    logits = torch.zeros(1, 257)
    for seed, counter in [(0, 0), (2**63 - 1, 3), (-5, 10**6)]:
        token = sample_tokens(logits, batch(1, seeds=[seed], counters=[counter]))[0]
        assert int(token) == int(exponential(seed, noise_offsets(counter, 257)).argmin())


def test_one_greedy_rule():
    for temperature, top_k, greedy in [(0.0, 0, True), (0.0, 7, True), (0.8, 1, True), (0.8, 0, False),
                                       (1.0, 2, False)]:
        assert is_greedy(temperature, top_k) is greedy
        assert SamplingParams(temperature=temperature, top_k=top_k).is_greedy is greedy
        assert batch(1, temperatures=[temperature], top_ks=[top_k]).all_greedy is greedy
    # a greedy row ignores its seed: the argmax, even with top-p and a seed
    logits = torch.tensor([[0.0, 3.0, 2.9]])
    assert sample_tokens(logits, batch(1, temperatures=[0.7], top_ks=[1], top_ps=[0.5])).tolist() == [1]


def test_a_sampled_row_without_a_seed_is_an_error():
    with pytest.raises(ValueError, match="row 1 samples .* seed is None"):
        sample_tokens(torch.zeros(2, 5), batch(2, seeds=[0, None]))


def test_rows_must_agree_in_length():
    with pytest.raises(ValueError, match="one entry per row"):
        batch(2, counters=[0])
    with pytest.raises(TypeError, match="counters"):
        SamplingBatch(temperatures=[1.0], top_ks=[0], top_ps=[1.0], seeds=[1], suppressed=[[]])


def test_generators_for_v1_backends_follow_seed_and_counter():
    b = batch(3, temperatures=[1.0, 0.0, 1.0], seeds=[5, None, 5], counters=[0, 0, 1])
    gens = b.generators
    assert gens[1] is None  # greedy row
    draws = [torch.rand(4, generator=g).tolist() for g in (gens[0], gens[2])]
    assert draws[0] != draws[1]  # a fresh stream per draw
    again = batch(3, temperatures=[1.0, 0.0, 1.0], seeds=[5, None, 5], counters=[0, 0, 1]).generators
    assert torch.rand(4, generator=again[0]).tolist() == draws[0]  # and a pure function of (seed, counter)


def test_a_batch_built_from_generators_is_deprecated_but_samples_by_their_seeds():
    logits = torch.zeros(2, 100)
    with pytest.warns(DeprecationWarning, match="seeds and counters"):
        old = SamplingBatch(temperatures=[1.0, 0.0], top_ks=[0, 0], top_ps=[1.0, 1.0],
                            generators=[torch.Generator().manual_seed(9), None], suppressed=[[], []])
    assert old.seeds == [9, None] and old.counters == [0, 0]
    assert sample_tokens(logits, old).tolist() == sample_tokens(logits, batch(2, seeds=[9, None],
                                                                             temperatures=[1.0, 0.0])).tolist()
