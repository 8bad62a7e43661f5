"""splitfuse's optional C++ CPU kernels, built at install time (see setup.py).

`load(name)` gives the module `splitfuse.native._<name>`, or None when it is not there to use: not
built (no C++ compiler at install time, or SPLITFUSE_NATIVE_BUILD=0), built for another CPU, or
turned off with SPLITFUSE_NATIVE=0 (every caller then runs its plain-torch op, e.g. to compare).
`unavailable_reason(name)` says which, in one line.

The kernels take tensors as raw pointers (`tensor.data_ptr()`) and release the GIL while they run;
callers check dtype, device and contiguity before calling.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch  # first, so the kernels' libgomp.so.1 is torch's: one OpenMP thread pool

from splitfuse.native.cpu_tag import cpu_tag

# how the kernels are told a float tensor's element type (native.h's DType)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

REBUILD = "reinstall splitfuse (pip install -e .) on this machine with a C++ compiler (g++) present"


def enabled() -> bool:
    return os.environ.get("SPLITFUSE_NATIVE", "1") != "0"


@functools.cache
def _import(name: str):
    """(module, '') or (None, why)."""
    try:
        module = importlib.import_module(f"splitfuse.native._{name}")
    except ImportError as exc:
        return None, f"splitfuse.native._{name} is not built ({exc}); {REBUILD}"
    built_for = getattr(module, "BUILD_TAG", "unknown")
    if not built_for.startswith("march=") and built_for != cpu_tag():
        return None, f"splitfuse.native._{name} was built for another CPU (-march=native there); {REBUILD}"
    return module, ""


def unavailable_reason(name: str) -> str:
    if not enabled():
        return "turned off (SPLITFUSE_NATIVE=0)"
    return _import(name)[1]


def load(name: str):
    """The kernel module, or None (see unavailable_reason)."""
    return _import(name)[0] if enabled() else None
