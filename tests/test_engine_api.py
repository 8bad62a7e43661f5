"""The Engine's public API as front ends use it: groups all or none, abort_all, stats, settings,
and a failed step that fails only the requests in it."""

from __future__ import annotations

import pickle

import pytest

from splitfuse.assembly import build_engine
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core.engine import AdmissionError, EngineSettings, EngineStats, StepError

GREEDY = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture
def make_engine(tiny_model_dir):
    def make(**config):
        config = {"num_kv_blocks": 32, "kv_block_size": 4, **config}
        return build_engine(tiny_model_dir("llama"), "cpu", EngineConfig(**config))

    return make


def run_all(engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def holds_nothing(engine) -> bool:
    stats = engine.stats()
    return (not engine.has_unfinished() and not engine.requests and stats.running == stats.waiting == 0
            and stats.kv_blocks_used == 0 and stats.kv_blocks_free == stats.kv_blocks_total)


# ---- add_requests ---------------------------------------------------------------------------------
def test_add_requests_queues_a_group_and_returns_its_ids_in_order(make_engine):
    engine = make_engine()
    ids = engine.add_requests([([1, 5, 9], GREEDY, "a"), ([1, 6], GREEDY, None), ([1, 7, 8, 9], GREEDY, "c")])
    assert ids[0] == "a" and ids[2] == "c" and ids[1] not in ("a", "c")
    assert engine.num_waiting == 3
    tokens = run_all(engine)
    assert sorted(tokens) == sorted(ids) and all(len(t) == 4 for t in tokens.values())
    assert holds_nothing(engine)


@pytest.mark.parametrize("bad, reason", [
    (([], GREEDY, "bad"), "prompt is empty"),
    (([1, 10**6], GREEDY, "bad"), "outside the vocabulary"),
    (([1, 2], SamplingParams(max_new_tokens=10_000), "bad"), "KV cache"),
    (([1, 2], GREEDY, "first"), "already in use"),  # the same id twice in one group
])
def test_a_refused_request_leaves_no_request_and_no_block_behind(make_engine, bad, reason):
    engine = make_engine()
    with pytest.raises(AdmissionError) as info:
        engine.add_requests([([1, 5, 9], GREEDY, "first"), ([1, 2, 3], GREEDY, None), bad])
    error = info.value
    assert (error.index, error.request_id) == (2, "bad" if bad[2] == "bad" else "first")
    assert reason in error.reason and str(error).startswith("request 2 (")
    assert holds_nothing(engine)


def test_a_refused_group_does_not_disturb_requests_already_running(make_engine):
    engine = make_engine()
    engine.add_requests([([1, 5, 9, 3, 4], GREEDY, "running")])
    engine.step()
    before = engine.stats()
    with pytest.raises(AdmissionError, match="request 1: prompt is empty"):
        engine.add_requests([([1, 2], GREEDY, None), ([], GREEDY, None)])
    with pytest.raises(AdmissionError, match="'running' is already in use"):
        engine.add_requests([([1, 2], GREEDY, "running")])
    assert engine.stats() == before and list(engine.requests) == ["running"]
    assert len(run_all(engine)["running"]) == 3  # its first token came with the step above


def test_admission_error_keeps_its_fields_across_processes():
    error = pickle.loads(pickle.dumps(AdmissionError("prompt is empty", 3, "r7-3")))
    assert (error.reason, error.index, error.request_id) == ("prompt is empty", 3, "r7-3")
    assert str(error) == "request 3 ('r7-3'): prompt is empty"


# ---- abort_all, stats, settings -------------------------------------------------------------------
def test_abort_all_stops_every_request_and_frees_every_block(make_engine):
    engine = make_engine(max_seqs=2)
    ids = engine.add_requests([([1, 5, 9], GREEDY, None) for _ in range(3)])
    engine.step()
    assert engine.stats().running == 2 and engine.stats().waiting == 1 and engine.stats().kv_blocks_used > 0
    assert sorted(engine.abort_all()) == sorted(ids)
    assert holds_nothing(engine)
    assert engine.abort_all() == []


def test_stats_count_queues_blocks_steps_and_preemptions(make_engine):
    # 8 blocks of 4 tokens; three requests that each grow to 16 tokens cannot all keep theirs.
    engine = make_engine(num_kv_blocks=8, max_seqs=3)
    assert engine.stats() == EngineStats(kv_blocks_free=8, kv_blocks_total=8)
    engine.add_requests([([1, 5 + i, 9, 4], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True), None)
                         for i in range(3)])
    assert engine.stats().waiting == 3
    engine.step()
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.steps) == (3, 0, 1)
    assert stats.kv_blocks_used == 3 and stats.kv_blocks_used + stats.kv_blocks_free == 8
    steps = 1
    while engine.has_unfinished():
        engine.step()
        steps += 1
    stats = engine.stats()
    assert stats.steps == steps and stats.preemptions > 0
    assert holds_nothing(engine)


def test_settings_say_what_the_engine_was_built_with(make_engine):
    engine = make_engine(max_model_len=48)
    assert engine.settings == EngineSettings(block_size=4, num_kv_blocks=32, max_model_len=48, dtype="float32",
                                             backend=engine.backend.describe())
    assert "cpu" in engine.settings.backend


def test_settings_resolve_what_the_config_leaves_open(make_engine):
    engine = make_engine(num_kv_blocks=None, kv_block_size=None, kv_cache_gib=0.001)
    settings = engine.settings
    assert settings.block_size == engine.backend.kv_block_size(engine.model.head_dim)
    assert settings.num_kv_blocks == engine.stats().kv_blocks_total > 0
    assert settings.max_model_len == engine.max_model_len


# ---- a failed step --------------------------------------------------------------------------------
def test_a_failed_step_aborts_only_its_requests_and_names_them(make_engine, monkeypatch):
    engine = make_engine(max_seqs=1)  # one request per step: the second waits outside the failure
    engine.add_requests([([1, 5, 9], GREEDY, "in-step"), ([1, 6, 9], GREEDY, "waiting")])
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.model, "forward", boom)
    with pytest.raises(StepError, match="RuntimeError: boom") as info:
        engine.step()
    monkeypatch.undo()
    assert info.value.request_ids == ["in-step"]
    assert isinstance(info.value.__cause__, RuntimeError)
    assert list(engine.requests) == ["waiting"] and engine.stats().kv_blocks_used == 0
    assert list(run_all(engine)) == ["waiting"]
    assert holds_nothing(engine)
