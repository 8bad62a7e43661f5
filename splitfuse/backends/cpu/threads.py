"""Pinning the OpenMP threads that run the cpu backend's ops to CPUs (EngineConfig.cpu_threads_bind,
CLI --cpu-threads-bind), as vLLM's VLLM_CPU_OMP_THREADS_BIND does: "auto" pins torch's current
threads to the first CPUs this process may use, one each; "0-1,4" pins one thread to each CPU listed
(and sets torch's thread count to match); "none" leaves threads free. Thread 0 is the calling
(main) thread: threads it starts afterwards inherit its CPU."""

from __future__ import annotations

import os

from splitfuse import native

MODULE = "cpu_threads"


def parse_cpu_list(spec: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]; ValueError naming cpu_threads_bind for anything else."""
    cpus: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            cpus += range(first, last + 1)
    except ValueError:
        raise ValueError(f"cpu_threads_bind={spec!r}: expected 'auto', 'none' or a CPU list such as '0-1' "
                         "or '0,2,4-7'") from None
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"cpu_threads_bind={spec!r} names a CPU twice")
    return cpus


def validate(spec: str | None) -> str | None:
    """The setting unchanged if well formed (see parse_cpu_list)."""
    if spec is not None and spec not in ("auto", "none"):
        parse_cpu_list(spec)
    return spec


def bind_threads(spec: str | None) -> list[int] | None:
    """Pin the OpenMP threads as `spec` says; the CPUs thread 0, 1, ... now run on, or None for 'none'."""
    import torch

    if spec in (None, "none"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if spec == "auto":
        cpus = allowed[:torch.get_num_threads()]
    else:
        cpus = parse_cpu_list(spec)
        outside = sorted(set(cpus) - set(allowed))
        if outside:
            raise ValueError(f"cpu_threads_bind={spec!r}: CPUs {outside} are not among those this process "
                             f"may use ({allowed})")
    module = native.load(MODULE)
    if module is None:
        raise RuntimeError(f"cpu_threads_bind={spec!r} needs the native thread helper: "
                           f"{native.unavailable_reason(MODULE)}")
    torch.set_num_threads(len(cpus))
    module.bind(cpus)
    return cpus


def thread_affinity() -> list[tuple[int, ...]]:
    """The CPUs each OpenMP thread may run on, in thread order (needs the native helper)."""
    module = native.load(MODULE)
    if module is None:
        raise RuntimeError(f"thread_affinity needs the native thread helper: {native.unavailable_reason(MODULE)}")
    return list(module.affinity())
