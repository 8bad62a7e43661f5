"""A forward pass that fails on one request fails that request alone: the engine reruns halves of
the batch until the offender is isolated; everyone else gets the tokens they would get alone."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fault_backends import MARKER, registered

import splitfuse
from splitfuse.assembly import build_engine
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core import engine as engine_module
from splitfuse.core.engine import StepError
from splitfuse.testing.server import wait_idle

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
CONFIG = {"num_kv_blocks": 64, "kv_block_size": 4, "token_budget": 64}


def prompts(count: int, marked: set[int]) -> list[list[int]]:
    return [[1, MARKER if i in marked else 20 + i, 30 + i, 40 + i % 5] for i in range(count)]


def alone(model_dir: str, prompt: list[int]) -> list[int]:
    engine = build_engine(model_dir, "cpu", EngineConfig(**CONFIG))
    engine.add_request(prompt, GREEDY, "alone")
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    return tokens


def test_a_failing_request_fails_alone_and_the_batch_keeps_its_tokens(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    batch = prompts(9, marked={2, 7})
    with registered() as name:
        engine = build_engine(model_dir, name, EngineConfig(**CONFIG))
    engine.add_requests([(p, GREEDY, f"r{i}") for i, p in enumerate(batch)])
    tokens: dict[str, list[int]] = {}
    failed: list[str] = []
    while engine.has_unfinished():
        try:
            outputs = engine.step()
        except StepError as exc:
            assert "injected fault" in str(exc)
            failed += exc.request_ids
            outputs = exc.outputs
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert sorted(failed) == ["r2", "r7"]
    assert sorted(tokens) == [f"r{i}" for i in range(9) if i not in (2, 7)]
    for i in (0, 5, 8):  # the tokens equal the request's run alone (greedy)
        assert tokens[f"r{i}"] == alone(model_dir, batch[i])
    assert all(len(t) == 6 for t in tokens.values())
    stats = engine.stats()
    assert not engine.requests and stats.kv_blocks_used == 0 and stats.kv_blocks_free == stats.kv_blocks_total


def test_one_failing_request_among_21_in_flight_is_the_only_500(tiny_model_dir):
    with registered() as name:
        handle = splitfuse.serve(tiny_model_dir("llama"), backend=name, kv_block_size=4, num_kv_blocks=256)
    try:
        batch = prompts(21, marked={13})

        async def run():
            async with httpx.AsyncClient(base_url=handle.url, timeout=60) as http:
                return await asyncio.gather(*(http.post("/v1/completions", json={
                    "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True}) for p in batch))

        replies = asyncio.run(run())
        assert [r.status_code for r in replies] == [500 if i == 13 else 200 for i in range(21)]
        error = replies[13].json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "server_error" and "injected fault" in error["message"]
        assert replies[0].json()["choices"][0]["text"] == httpx.post(handle.url + "/v1/completions", json={
            "prompt": batch[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
        stats = wait_idle(handle.url)
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    finally:
        handle.terminate()


def test_a_rerun_after_a_late_failure_keeps_prompt_logprobs_and_seeded_samples_exact(tiny_model_dir, monkeypatch):
    """A pass that fails after scoring the prompts and drawing samples is rerun without counting
    those twice: prompt log-probabilities and seeded tokens equal the requests' runs alone."""
    model_dir = tiny_model_dir("llama")
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=5, ignore_eos=True, logprobs=1,
                            prompt_logprobs=1)
    batch = [[1, 20, 30, 40, 50], [1, 21, 31, 41]]

    def run(engine, prompts):
        engine.add_requests([(p, params, f"r{i}") for i, p in enumerate(prompts)])
        firsts, tokens = {}, {}
        while engine.has_unfinished():
            try:
                outputs = engine.step()
            except StepError as exc:
                raise AssertionError(f"no request should fail: {exc}") from exc
            for out in outputs:
                firsts.setdefault(out.request_id, out.prompt_logprobs)
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return firsts, tokens

    engine = build_engine(model_dir, "cpu", EngineConfig(**CONFIG))
    sampled_logprobs = engine_module.token_logprobs

    def fails_when_batched(logits, tokens, wants):  # after prompt scoring, sampling and draw counting
        if len(wants) > 1:
            raise RuntimeError("injected late fault")
        return sampled_logprobs(logits, tokens, wants)

    monkeypatch.setattr(engine_module, "token_logprobs", fails_when_batched)
    firsts, tokens = run(engine, batch)
    monkeypatch.undo()
    for i, prompt in enumerate(batch):
        alone_firsts, alone_tokens = run(build_engine(model_dir, "cpu", EngineConfig(**CONFIG)), [prompt])
        assert len(firsts[f"r{i}"]) == len(prompt)  # None for the first token, then one entry per token
        # scored in the failed batched pass, alone: the same up to the last bits of a matmul whose
        # batch differs
        got, alone = firsts[f"r{i}"], alone_firsts["r0"]
        assert got[0] is None and alone[0] is None
        assert [e.token_id for e in got[1:]] == [e.token_id for e in alone[1:]]
        assert [e.logprob for e in got[1:]] == pytest.approx([e.logprob for e in alone[1:]], abs=1e-5)
        assert tokens[f"r{i}"] == alone_tokens["r0"]
