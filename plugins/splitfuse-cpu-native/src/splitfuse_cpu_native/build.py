"""Builds the C++ ops on first use with torch's JIT extension builder and says why it cannot.

The build is cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and reused
until the source, the flags or torch change. -march=native tunes it to this CPU, so the cache
entry's name carries a hash of the CPU's model and flags (a home directory shared by different
machines then keeps one build per CPU).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sysconfig
import time
from pathlib import Path

log = logging.getLogger("splitfuse")

SOURCE = Path(__file__).with_name("csrc") / "ops.cpp"
# -ffp-contract=off: no fused multiply-adds, so the elementwise ops round as torch's fp32 ops do
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]  # resolves to the libgomp torch already loaded (same soname): one thread pool

_failure = ""  # why the last build failed in this process
build_seconds: float | None = None  # wall time of this process's build or cache load


def compiler() -> str:
    return os.environ.get("CXX") or "c++"  # what torch's builder runs


def _ninja_on_path() -> bool:
    """torch runs `ninja`: found on PATH, or the pip package's binary put there (a venv not activated)."""
    if shutil.which("ninja"):
        return True
    scripts = sysconfig.get_path("scripts")  # this interpreter's bin/, where pip put ninja
    if scripts and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
        return True
    try:
        import ninja  # the pip package

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return shutil.which("ninja") is not None
    except (ImportError, AttributeError):
        return False


def unavailable_reason() -> str:
    """'' when the ops can be built (or were) here, else one line saying what is missing."""
    if _failure:
        return f"the C++ ops failed to build: {_failure}"
    cxx = compiler()
    if shutil.which(cxx) is None:
        return f"no C++ compiler (g++): {cxx!r} is not on PATH; install g++ or set CXX"
    if not _ninja_on_path():
        return "ninja is not installed (pip install ninja): torch's extension builder needs it"
    return ""


def _cpu_tag() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return hashlib.sha1("\n".join(lines + [compiler()]).encode()).hexdigest()[:10]


@functools.cache
def ops():
    """torch.ops.splitfuse_cpu_native, compiling the source the first time (tens of seconds)."""
    global _failure, build_seconds
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"cpu-native is unavailable: {reason}")
    import torch
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    try:
        load(name=f"splitfuse_cpu_native_{_cpu_tag()}", sources=[str(SOURCE)], extra_cflags=CFLAGS,
             extra_ldflags=LDFLAGS, is_python_module=False, verbose=False)
    except Exception as exc:
        _failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
        raise RuntimeError(f"cpu-native: building the C++ ops failed ({_failure})") from exc
    build_seconds = time.perf_counter() - start
    log.info("cpu-native: C++ ops ready in %.1f s", build_seconds)
    return torch.ops.splitfuse_cpu_native
