"""torch.xpu probing: whether a usable device is here (and precisely why not), and memory figures.

Every function reads torch.xpu at call time, never at import, so listing backends on a build
without XPU support costs nothing and tests can replace torch.xpu's functions.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("splitfuse")

_INSTALL_HINT = "install a PyTorch XPU build (pip install torch --index-url https://download.pytorch.org/whl/xpu)"


def unavailable_reason() -> str:
    """'' when torch.xpu has a device, else one line: no torch.xpu / not compiled / no device / driver error."""
    xpu = getattr(torch, "xpu", None)
    if xpu is None:
        return f"this torch build ({torch.__version__}) has no torch.xpu module; {_INSTALL_HINT}"
    is_compiled = getattr(xpu, "_is_compiled", None)
    if is_compiled is not None and not is_compiled():
        return f"torch {torch.__version__} was built without XPU support; {_INSTALL_HINT}"
    try:
        available = xpu.is_available()
    except Exception as exc:  # a broken driver or runtime: report its own words
        return f"the XPU driver failed: {type(exc).__name__}: {exc}"
    if not available:
        return ("no XPU device found (torch.xpu.is_available() is False): check the Intel GPU driver "
                "and ZE_AFFINITY_MASK / ONEAPI_DEVICE_SELECTOR")
    return ""


def device_count() -> int:
    return torch.xpu.device_count() if unavailable_reason() == "" else 0


def memory_in_use(device: torch.device, xpu=None) -> tuple[int, int, str]:
    """(total bytes, bytes in use, how it was measured) on one XPU device of `xpu` (torch.xpu
    unless given).

    torch.xpu.mem_get_info sees every process's use but needs driver support (Level Zero's free
    memory extension); where it is missing or fails, total memory from the device properties less
    what this process's caching allocator holds (other processes' use is then invisible)."""
    xpu = torch.xpu if xpu is None else xpu
    mem_get_info = getattr(xpu, "mem_get_info", None)
    if mem_get_info is not None:
        try:
            free, total = mem_get_info(device)
            return int(total), int(total - free), "torch.xpu.mem_get_info"
        except (RuntimeError, NotImplementedError) as exc:
            log.info("torch.xpu.mem_get_info is unsupported here (%s); sizing from this process's use", exc)
    total = int(xpu.get_device_properties(device).total_memory)
    used = max(int(xpu.memory_reserved(device)), int(xpu.memory_allocated(device)))
    return total, used, "total_memory - memory_reserved (this process only)"
