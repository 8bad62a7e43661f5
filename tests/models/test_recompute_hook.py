"""`CausalLM.recompute_kv_at_length`: a sequence reaching the length the model names has its K/V
recomputed by the engine, and its output is what it would have been without."""

from __future__ import annotations

import pytest

import splitfuse
from splitfuse.testing.parity import make_prompts

VARIANTS = {"llama": ("llama", {})}
RECOMPUTE_AT = 10


@pytest.fixture
def pipe(model_dir):
    return splitfuse.pipeline(model_dir("llama"), backend="cpu", token_budget=16, kv_block_size=4)


def run_recording_recomputes(pipe, prompts, monkeypatch) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens for prompts, and the length of each sequence the engine recomputed."""
    scheduler = pipe.engine.scheduler
    recomputed: list[int] = []
    original = scheduler.recompute

    def recording(seq):
        recomputed.append(len(seq.token_ids))
        original(seq)

    monkeypatch.setattr(scheduler, "recompute", recording)
    responses = pipe(prompts, max_new_tokens=12, temperature=0.0)
    return [r.token_ids for r in responses], recomputed


def test_no_recompute_by_default(pipe, monkeypatch):
    assert pipe.engine.model.recompute_kv_at_length() is None
    _, recomputed = run_recording_recomputes(pipe, make_prompts()[:4], monkeypatch)
    assert recomputed == []


def test_a_sequence_reaching_the_length_is_recomputed_to_the_same_tokens(pipe, monkeypatch):
    prompts = make_prompts()[:4]  # 1, 2, 7 and 33 tokens, 12 generated each
    before, _ = run_recording_recomputes(pipe, prompts, monkeypatch)
    monkeypatch.setattr(pipe.engine.model, "recompute_kv_at_length", lambda: RECOMPUTE_AT)
    after, recomputed = run_recording_recomputes(pipe, prompts, monkeypatch)
    # the 1-, 2- and 7-token prompts grow through 10 tokens while generating, the 33-token one never
    assert recomputed == [RECOMPUTE_AT] * 3
    assert after == before
    assert pipe.engine.blocks.num_free == pipe.engine.blocks.num_blocks
