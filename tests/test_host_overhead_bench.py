"""scripts/bench_host_overhead.py runs at a tiny size and prints the host-work-alone table."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_host_only_steps_print_every_phase(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_host_overhead")
    monkeypatch.setattr(sys, "argv", ["bench_host_overhead.py", "--seqs", "4", "--prompt-len", "8", "--steps", "1",
                                      "--rounds", "1", "--token-budget", "16", "--host-only-steps", "3"])
    assert bench.main() == 0
    alone = capsys.readouterr().out.split("Host work alone")[1]
    rows = dict(re.findall(r"^\| (.+?) \| (\d+) \|$", alone, re.MULTILINE))
    assert set(bench.PHASES) | {"step", "step, thread CPU time"} <= set(rows)
    assert int(rows["step"]) > 0 and int(rows["Scheduler.apply"]) > 0


def test_every_backend_op_of_the_forward_is_timed_with_its_calls_per_step(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_host_overhead")
    monkeypatch.setattr(sys, "argv", ["bench_host_overhead.py", "--seqs", "4", "--prompt-len", "8", "--steps", "1",
                                      "--rounds", "1", "--token-budget", "16"])
    assert bench.main() == 0
    table = capsys.readouterr().out.split("forward ops, every timed step")[1]
    calls = {op: int(n) for op, n in re.findall(r"^\| (\w+) \| (\d+) \| [\d.]+ \| \d+ \|$", table, re.MULTILINE)}
    # the demo model: 4 layers, two norms each and the final one, one attention and one MLP each
    assert calls == {"embedding": 1, "rms_norm": 9, "rotary_write_kv": 4, "paged_attention": 4, "silu_and_mul": 4}
