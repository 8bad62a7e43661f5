"""The one engine loop both front ends run: fed a script of commands (as AsyncEngine's thread would
be) and fed through a pipe (as a replica process is), it admits all or none, turns groups away when
the queue is full, drains or aborts on close, and fails only the requests of a failed step."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from splitfuse.assembly import build_engine
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core.engine import AdmissionError, EngineStats
from splitfuse.serving.errors import EngineClosed, EngineError, EngineStopped, QueueFull
from splitfuse.serving.loop import Abort, AddGroup, Close, EngineLoop
from splitfuse.serving.replica_worker import PipeEnds

LONG = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


def group(group_id: int, *prompts: list[int], params: SamplingParams = LONG) -> AddGroup:
    return AddGroup(group_id, [(list(p), params, f"g{group_id}-{i}") for i, p in enumerate(prompts)])


@pytest.fixture
def engine(tiny_model_dir):
    return build_engine(tiny_model_dir("llama"), "cpu", EngineConfig(num_kv_blocks=32, kv_block_size=4, max_seqs=1))


class Script:
    """A command source that hands out one scripted batch per take(); past the script, Close."""

    def __init__(self, *batches: list) -> None:
        self.batches = list(batches)
        self.closed = False

    def take(self, block: bool) -> list:
        if self.batches:
            return self.batches.pop(0)
        return [Close()] if block else []

    def close(self) -> list:
        self.closed = True
        leftover, self.batches = [b for batch in self.batches for b in batch], []
        return leftover


class Recorder:
    """A sink that keeps what the loop reported."""

    def __init__(self) -> None:
        self.admissions: dict[int, Exception | None] = {}
        self.results: dict[str, list] = {}
        self.stats: list[EngineStats] = []

    def admitted(self, group_id, error) -> None:
        self.admissions[group_id] = error

    def outputs(self, outputs, stats) -> None:
        for request_id, payload in outputs:
            self.results.setdefault(request_id, []).append(payload)
        self.stats.append(stats)

    def publish(self, stats) -> None:
        self.stats.append(stats)

    def tokens(self, request_id: str) -> int:
        return sum(len(p.new_token_ids) for p in self.results[request_id] if not isinstance(p, Exception))


def run(engine, *batches, max_waiting: int = 1024) -> tuple[Recorder, Script]:
    source, sink = Script(*batches), Recorder()
    EngineLoop(engine, source, sink, max_waiting).run()
    return sink, source


def test_groups_are_admitted_all_or_none_and_run_to_the_end(engine):
    sink, _ = run(engine, [group(0, [1, 5, 9], [1, 6]), group(1, [1, 2], [])])
    assert sink.admissions[0] is None
    refused = sink.admissions[1]
    assert isinstance(refused, AdmissionError) and (refused.index, refused.request_id) == (1, "g1-1")
    assert sorted(sink.results) == ["g0-0", "g0-1"]
    assert sink.tokens("g0-0") == sink.tokens("g0-1") == 12
    assert sink.stats[-1].kv_blocks_used == 0 and sink.stats[-1].running == 0


def test_a_full_queue_turns_the_group_away(engine):
    # max_seqs=1: group 0 takes the one slot, so both of group 1 would wait.
    sink, _ = run(engine, [group(0, [1, 5]), group(1, [1, 6], [1, 7])], max_waiting=1)
    assert sink.admissions[0] is None
    assert isinstance(sink.admissions[1], QueueFull) and "max_waiting=1" in str(sink.admissions[1])
    assert list(sink.results) == ["g0-0"]


def test_close_with_drain_finishes_what_it_holds_and_refuses_the_rest(engine):
    # The group after Close, and the one that arrives while draining, are refused; none is dropped.
    sink, source = run(engine, [group(0, [1, 5, 9]), Close(drain=True), group(1, [1, 2])], [group(2, [1, 3])])
    assert sink.admissions[0] is None
    assert isinstance(sink.admissions[1], EngineStopped) and isinstance(sink.admissions[2], EngineStopped)
    assert sink.tokens("g0-0") == 12 and sink.results["g0-0"][-1].finished
    assert source.closed and not engine.has_unfinished()


def test_close_without_drain_fails_what_it_holds_with_engine_closed(engine):
    sink, _ = run(engine, [group(0, [1, 5, 9], [1, 6, 9])], [Close(drain=False)])
    assert [type(p[-1]) for p in sink.results.values()] == [EngineClosed, EngineClosed]
    assert sink.stats[-1].kv_blocks_used == 0 and not engine.has_unfinished()


def test_an_aborted_request_stops(engine):
    sink, _ = run(engine, [group(0, [1, 5, 9])], [Abort("g0-0")])
    assert sink.tokens("g0-0") == 1 and not sink.results["g0-0"][-1].finished
    assert sink.stats[-1].kv_blocks_used == 0


def test_a_failed_step_fails_only_its_requests(engine, fail_once):
    fail_once(engine.model, "forward", "boom")
    # max_seqs=1: the second group waits outside the failing step.
    sink, _ = run(engine, [group(0, [1, 5, 9]), group(1, [1, 6, 9])])
    [failed] = sink.results["g0-0"]
    assert isinstance(failed, EngineError) and "boom" in str(failed)
    assert sink.tokens("g1-0") == 12
    assert sink.stats[-1].kv_blocks_used == 0


# ---- the same loop through a replica's pipe -------------------------------------------------------
def test_through_a_pipe_the_same_loop_turns_away_drains_and_refuses(engine):
    """The loop on one end of a pipe, in a thread (as a replica process runs it), driven from the other."""
    front, back = multiprocessing.Pipe()
    ends = PipeEnds(back)
    thread = threading.Thread(target=EngineLoop(engine, ends, ends, max_waiting=1).run, daemon=True)
    thread.start()
    front.send(group(0, [1, 5, 9]))
    front.send(group(1, [1, 6], [1, 7]))  # two requests > max_waiting=1
    front.send(Close(drain=True))
    front.send(group(2, [1, 2]))
    messages = []
    deadline = time.monotonic() + 60
    while thread.is_alive() or front.poll(0):  # read as it goes: a full pipe would block the loop
        assert time.monotonic() < deadline, f"the loop did not finish; so far {messages}"
        if front.poll(0.05):
            messages.append(front.recv())
    assert messages[0][0] == "stats"  # published before anything else
    admissions = {m[1]: m[2] for m in messages if m[0] == "admitted"}
    assert admissions[0] is None
    assert isinstance(admissions[1], QueueFull) and isinstance(admissions[2], EngineStopped)
    outputs = [payload for m in messages if m[0] == "outputs" for _, payload in m[1]]
    assert sum(len(o.new_token_ids) for o in outputs) == 12 and outputs[-1].finished
    assert messages[-1][2].kv_blocks_used == 0  # stats ride with the outputs
