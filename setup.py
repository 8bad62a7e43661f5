"""Builds splitfuse's optional C++ CPU kernels at install time; everything else is in pyproject.toml.

Every `splitfuse/native/csrc/*.cpp` becomes the module `splitfuse.native._<name>`. The kernels use
no torch headers (they take raw pointers from tensors), so the build needs only a C++ compiler with
OpenMP, never a torch in the build environment. A build that fails (no compiler) is skipped with a
warning: splitfuse then runs its plain-torch ops, and `splitfuse backends` says why.

Environment:
  SPLITFUSE_NATIVE_BUILD=0        skip the kernels
  SPLITFUSE_NATIVE_MARCH=x86-64-v3  target this instruction set instead of the build machine's own
                                    (-march=native); set it when building a wheel for other machines
"""

from __future__ import annotations

import os
from pathlib import Path

import sys

from setuptools import Extension, setup

# the CPU tag without importing splitfuse (and torch): the build environment has neither
sys.path.insert(0, str(Path(__file__).parent / "splitfuse" / "native"))
from cpu_tag import cpu_tag  # noqa: E402

HERE = Path(__file__).parent
CSRC = Path("splitfuse/native/csrc")


def _native_extensions() -> list[Extension]:
    if os.environ.get("SPLITFUSE_NATIVE_BUILD", "1") == "0":
        return []
    march = os.environ.get("SPLITFUSE_NATIVE_MARCH", "native")
    # the CPU the kernels were tuned for: the loader refuses them on another CPU (illegal instructions)
    tag = cpu_tag() if march == "native" else f"march={march}"
    # -ffp-contract=off: no fused multiply-adds where the kernels must round as torch's fp32 ops do
    # (a kernel that wants FMAs asks for them with intrinsics)
    cflags = ["-O3", f"-march={march}", "-fopenmp", "-ffp-contract=off", "-std=c++17",
              f'-DSPLITFUSE_BUILD_TAG="{tag}"']
    headers = [str(p) for p in sorted((HERE / CSRC).glob("*.h"))]
    return [Extension(f"splitfuse.native._{src.stem}", sources=[str(CSRC / src.name)], depends=headers,
                      include_dirs=[str(CSRC)], extra_compile_args=cflags,
                      # -fopenmp links libgomp.so.1, which resolves to the one torch already loaded
                      # (torch ships the same soname): one OpenMP thread pool, not two
                      extra_link_args=["-fopenmp"], language="c++", optional=True)
            for src in sorted((HERE / CSRC).glob("*.cpp"))]


setup(ext_modules=_native_extensions())
