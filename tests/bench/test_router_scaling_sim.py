"""The router-scaling benchmark's simulated engine keeps the interface the engine loop uses (the
loop admits through the queue limits, which read the scheduler and the KV blocks), so the Ray
benchmark does not break unseen when the loop changes. No Ray here: the loop runs in-process."""

from __future__ import annotations

import importlib
from pathlib import Path

from splitfuse.config import SamplingParams
from splitfuse.serving.loop import AddGroup, Close, EngineLoop

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


class Commands:
    """A CommandSource that hands over a fixed list once, then says the loop is closed."""

    def __init__(self, commands):
        self.pending = list(commands)

    def take(self, block: bool):
        taken, self.pending = self.pending, []
        return taken

    def close(self):
        return []


class Recorder:
    def __init__(self):
        self.errors, self.finished = [], []

    def admitted(self, group_id, error):
        self.errors.append(error)

    def outputs(self, outputs, stats):
        self.finished += [rid for rid, out in outputs if getattr(out, "finished", False)]

    def publish(self, stats):
        pass


def test_the_simulated_engine_runs_under_the_engine_loop(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_router_scaling")
    engine = bench.SimEngine(max_seqs=4, step_base_s=0.0, step_per_token_s=0.0)
    params = SamplingParams(max_new_tokens=3, temperature=0.0)
    requests = [(list(range(16)), params, f"r{i}") for i in range(6)]  # more than max_seqs: some wait
    sink = Recorder()
    EngineLoop(engine, Commands([AddGroup(0, requests), Close(drain=True)]), sink, max_waiting=8).run()
    assert sink.errors == [None]
    assert sorted(sink.finished) == [f"r{i}" for i in range(6)]
    assert engine.stats().kv_blocks_used == 0
