"""Which op implementations the xpu backend runs: the shared Triton kernels where Triton can compile
for Intel GPUs, otherwise the generic torch ops of `Backend`.

Detection reads package metadata and files only: importing triton's backends would import the
CUDA one's driver module, and importing triton at all is skipped until it is going to be used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

from splitfuse.backends.device_backend import env_flag
from splitfuse.backends.triton import triton_import_error

KERNELS_ENV = "SPLITFUSE_XPU_KERNELS"  # auto | triton | torch
CHOICES = ("auto", "triton", "torch")


def triton_has_xpu_backend() -> bool:
    """Whether the installed triton has its Intel (XPU) backend, as PyTorch's XPU wheels ship it
    (pytorch-triton-xpu): registered as the `intel` entry point or present in triton/backends/."""
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return False
    try:
        if any(ep.name == "intel" for ep in importlib.metadata.entry_points(group="triton.backends")):
            return True
    except Exception:  # broken metadata of an unrelated distribution
        pass
    locations = spec.submodule_search_locations or []
    return any(os.path.isfile(os.path.join(loc, "backends", "intel", "compiler.py")) for loc in locations)


def requested() -> str:
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{KERNELS_ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def triton_unusable_reason(device_type: str) -> str:
    """'' when the Triton kernels can run on this device type, else why not."""
    if device_type == "cpu":  # the test mode: only the Triton interpreter runs kernels on the CPU
        if not env_flag("TRITON_INTERPRET"):
            return "the Triton kernels run on the CPU only under TRITON_INTERPRET=1"
        return triton_import_error()
    if not triton_has_xpu_backend():
        return "triton has no Intel XPU backend here (PyTorch's XPU builds ship it as pytorch-triton-xpu)"
    return triton_import_error()


def choose(device_type: str) -> str:
    """'triton' or 'torch' for a device type, honouring SPLITFUSE_XPU_KERNELS."""
    want = requested()
    if want == "torch":
        return "torch"
    reason = triton_unusable_reason(device_type)
    if want == "triton" and reason:
        raise RuntimeError(f"{KERNELS_ENV}=triton, but {reason}")
    return "torch" if reason else "triton"
