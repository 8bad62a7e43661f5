"""Sampling: filters agree with HF's logits warpers, draws follow the filtered distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

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
                    generators=[torch.Generator().manual_seed(i) for i in range(rows)], suppressed=[[]] * rows)
    defaults.update(kw)
    return SamplingBatch(**defaults)


def test_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample_tokens(logits, batch(1, generators=[gen]))[0]] += 1
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)


def test_top_k_never_draws_outside_the_top_k():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_tokens(logits, batch(1, top_ks=[3], generators=[gen]))[0]) for _ in range(300)}
    assert drawn <= allowed and len(drawn) == 3


def test_greedy_rows_take_the_argmax_and_suppressed_ids_are_never_picked():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    b = batch(2, temperatures=[0.0, 0.0], generators=[None, None], suppressed=[[], [1]])
    assert sample_tokens(logits, b).tolist() == [1, 2]


def test_each_row_uses_its_own_generator():
    logits = torch.zeros(3, 1000)  # uniform: any shared random state would show
    first = sample_tokens(logits, batch(3)).tolist()
    again = sample_tokens(logits, batch(3)).tolist()
    assert first == again  # same seeds per row, same draws
    alone = sample_tokens(logits[1:2], batch(1, generators=[torch.Generator().manual_seed(1)])).tolist()
    assert alone == first[1:2]
