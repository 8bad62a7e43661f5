"""AsyncEngine without HTTP: admission, abort on early exit, queue limit, step failures, drain."""

from __future__ import annotations

import asyncio

import pytest

from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core.engine import AdmissionError
from splitfuse.assembly import build_engine
from splitfuse.serving.bridge import AsyncEngine, EngineClosed, EngineError, EngineStopped, QueueFull

GREEDY = SamplingParams(max_new_tokens=6, temperature=0)


@pytest.fixture
def engine(tiny_model_dir):
    async_engine = AsyncEngine(build_engine(tiny_model_dir("llama"), "cpu",
                                            EngineConfig(num_kv_blocks=64, kv_block_size=16)))
    yield async_engine
    async_engine.close(drain=False)


async def _collect(engine: AsyncEngine, ids: list[int], params: SamplingParams = GREEDY):
    return [out async for out in engine.generate(ids, params)]


def _wait_free(engine: AsyncEngine) -> None:
    for _ in range(200):
        if engine.stats.kv_blocks_used == 0 and engine.stats.running == 0:
            return
        asyncio.run(asyncio.sleep(0.01))
    raise AssertionError(f"blocks still held: {engine.stats}")


def test_concurrent_requests_share_steps_and_match_sequential(engine):
    async def run():
        together = await asyncio.gather(*(_collect(engine, [1, 5 + i, 9]) for i in range(4)))
        alone = [await _collect(engine, [1, 5 + i, 9]) for i in range(4)]
        return together, alone

    together, alone = asyncio.run(run())
    tokens = [[t for o in outs for t in o.new_token_ids] for outs in together]
    assert tokens == [[t for o in outs for t in o.new_token_ids] for outs in alone]
    assert all(outs[-1].finished and len(t) == 6 for outs, t in zip(together, tokens))


def test_admission_error_reaches_the_caller(engine):
    with pytest.raises(AdmissionError):
        asyncio.run(_collect(engine, []))


def test_leaving_early_aborts_and_frees_blocks(engine):
    async def run():
        params = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
        stream = engine.generate([1, 2, 3], params)
        first = await anext(stream)
        await stream.aclose()
        return first

    assert not asyncio.run(run()).finished
    _wait_free(engine)
    assert engine.engine.blocks.num_free == engine.engine.blocks.num_blocks


def test_cancelled_task_aborts_its_request(engine):
    async def run():
        params = SamplingParams(max_new_tokens=400, temperature=0, ignore_eos=True)
        task = asyncio.create_task(_collect(engine, [1, 2, 3], params))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    _wait_free(engine)


def test_queue_limit_raises_queue_full(engine):
    engine.max_waiting = 0  # three 500-token prompts need 96 of the 64 KV blocks: one would wait
    with pytest.raises(QueueFull):
        asyncio.run(engine.submit([(list(range(1, 501)), SamplingParams(max_new_tokens=2))] * 3))


def test_failed_step_fails_its_requests_and_the_loop_goes_on(engine, fail_once):
    fail_once(engine.engine.model, "forward", "boom")
    with pytest.raises(EngineError, match="boom"):
        asyncio.run(_collect(engine, [1, 2, 3]))
    assert asyncio.run(_collect(engine, [1, 2, 3]))[-1].finished
    _wait_free(engine)


def test_close_drains_running_requests_then_refuses_new_ones(engine):
    async def run():
        task = asyncio.create_task(_collect(engine, [1, 2, 3], SamplingParams(max_new_tokens=30, temperature=0,
                                                                              ignore_eos=True)))
        await asyncio.sleep(0.02)
        await asyncio.to_thread(engine.close, True)
        return await task

    outputs = asyncio.run(run())
    assert outputs[-1].finished and sum(len(o.new_token_ids) for o in outputs) == 30
    assert not engine.ready
    with pytest.raises(EngineStopped):
        asyncio.run(_collect(engine, [1, 2]))


def test_close_without_drain_fails_running_requests_with_engine_closed(engine):
    async def run():
        task = asyncio.create_task(_collect(engine, [1, 2, 3], SamplingParams(max_new_tokens=400, temperature=0,
                                                                              ignore_eos=True)))
        while engine.stats.running == 0:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.close, False)
        with pytest.raises(EngineClosed):
            await task

    asyncio.run(run())
    assert not engine.ready
    assert engine.engine.blocks.num_free == engine.engine.blocks.num_blocks


def test_engine_settings_and_stats_reach_the_front(engine):
    assert engine.settings == engine.engine.settings and engine.settings.block_size == 16
    assert engine.stats.kv_blocks_total == 64 and engine.stats.preemptions == 0


def test_an_engine_thread_that_dies_leaves_no_caller_waiting(engine, monkeypatch):
    def broken_step():
        raise RuntimeError("a bug outside the engine's step")

    monkeypatch.setattr(engine.engine, "step", broken_step)  # not a StepError: the loop itself stops
    with pytest.raises(EngineError, match="stopped while serving"):
        asyncio.run(_collect(engine, [1, 2, 3]))
    assert not engine.ready
    with pytest.raises(EngineStopped):
        asyncio.run(_collect(engine, [1, 2]))
