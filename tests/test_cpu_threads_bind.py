"""EngineConfig.cpu_threads_bind / --cpu-threads-bind: OpenMP threads pinned to CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from splitfuse.backends.cpu.threads import parse_cpu_list
from splitfuse.config import EngineConfig

ALLOWED = sorted(os.sched_getaffinity(0))


def test_cpu_lists_parse():
    assert parse_cpu_list("0-2,5") == [0, 1, 2, 5]
    assert parse_cpu_list("3") == [3]


@pytest.mark.parametrize("spec", ["", "a", "2-1", "-1", "0,0"])
def test_bad_settings_are_refused_naming_the_field(spec):
    with pytest.raises(ValidationError, match="cpu_threads_bind"):
        EngineConfig(cpu_threads_bind=spec)


def test_the_cli_carries_the_option():
    from splitfuse.cli import engine_flags

    assert engine_flags({"cpu_threads_bind": "0-1"}) == ["--cpu-threads-bind", "0-1"]


def run_isolated(code: str) -> str:
    """Runs code in a fresh interpreter: pinning is for the whole process and cannot be undone."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_binding_pins_each_openmp_thread_to_its_cpu():
    cpus = ALLOWED[:2][::-1]  # reversed: thread 0 on the second CPU, where there is one
    out = run_isolated(f"""
        import torch
        from splitfuse.backends.cpu.threads import bind_threads, thread_affinity
        print(bind_threads({",".join(map(str, cpus))!r}))
        torch.randn(512, 512) @ torch.randn(512, 512)  # torch's own parallel op, same pool
        print(thread_affinity())
        print(open("/proc/self/status").read().split("Cpus_allowed_list:")[1].split()[0])
    """)
    bound, per_thread, main_thread = out.splitlines()
    assert bound == str(cpus)
    assert per_thread == str([(cpu,) for cpu in cpus])
    assert main_thread == str(cpus[0])  # the main thread is OpenMP thread 0


def test_cpus_outside_the_process_mask_are_refused():
    from splitfuse.backends.cpu.threads import bind_threads

    with pytest.raises(ValueError, match="not among those this process may use"):
        bind_threads(str(max(ALLOWED) + 1000))


def test_the_engine_pins_its_threads_with_auto_after_none_left_them_free():
    out = run_isolated("""
        from splitfuse.assembly import build_engine
        from splitfuse.backends.cpu.threads import bind_threads, thread_affinity
        from splitfuse.config import EngineConfig
        before = thread_affinity()
        print(bind_threads("none"), thread_affinity() == before)
        engine = build_engine(backend="cpu", config=EngineConfig(cpu_threads_bind="auto", num_kv_blocks=8))
        print(thread_affinity())
    """)
    unchanged, per_thread = out.splitlines()[-2:]
    assert unchanged == "None True"
    assert per_thread == str([(cpu,) for cpu in ALLOWED[:2]])  # torch's 2 threads, one per allowed CPU


def test_other_backends_refuse_the_setting():
    from splitfuse.assembly import bind_cpu_threads
    from splitfuse.backends import Backend

    with pytest.raises(ValueError, match="cpu_threads_bind='auto' applies to the cpu backend only"):
        bind_cpu_threads(Backend(), "auto")


def test_without_the_native_helper_binding_says_why(monkeypatch):
    from splitfuse.backends.cpu.threads import bind_threads

    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")
    with pytest.raises(RuntimeError, match=r"cpu_threads_bind='auto' needs the native thread helper: turned off"):
        bind_threads("auto")
