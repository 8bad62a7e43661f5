"""The shared-prefix workload: every prompt starts with the same tokens, then its own suffix."""

from __future__ import annotations

import pytest

from splitfuse.bench.workloads import synthetic


def test_every_prompt_starts_with_the_same_prefix_then_its_own_suffix():
    requests = synthetic(8, prompt_len=32, gen_len=32, variance=0.0, max_len=1024, vocab_size=500, seed=3,
                         exclude={0}, shared_prefix_len=768)
    prefix = requests[0].prompt_ids[:768]
    assert all(r.prompt_ids[:768] == prefix for r in requests)
    assert all(len(r.prompt_ids) == 768 + 32 and r.gen_len == 32 for r in requests)
    suffixes = {tuple(r.prompt_ids[768:]) for r in requests}
    assert len(suffixes) == 8, "suffixes must differ, or the whole prompt would be shared"
    assert 0 not in {t for r in requests for t in r.prompt_ids}


def test_the_suffix_and_generation_are_clamped_to_what_the_prefix_leaves():
    requests = synthetic(50, prompt_len=100, gen_len=50, variance=0.3, max_len=200, vocab_size=50, seed=1,
                         shared_prefix_len=150)
    assert all(len(r.prompt_ids) > 150 and len(r.prompt_ids) + r.gen_len <= 200 for r in requests)


def test_a_prefix_that_leaves_no_room_is_refused():
    with pytest.raises(ValueError, match="--shared-prefix-len 199 leaves no room"):
        synthetic(1, 10, 10, 0.0, max_len=200, vocab_size=50, seed=0, shared_prefix_len=199)
