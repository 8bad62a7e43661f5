"""A short tag naming this CPU (model and instruction-set flags), importable without torch.

Kernels built with -march=native are tuned to the build machine; the loader compares the tag they
were built with to this machine's, so a copied build fails with a reason, not an illegal instruction.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path


def cpu_tag() -> str:
    try:
        lines = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith(("model name", "flags", "Features", "CPU part"))]
        lines = sorted(set(lines))
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha1("\n".join([platform.machine(), *lines]).encode()).hexdigest()[:12]
