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
