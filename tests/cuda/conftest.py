"""Tests of the Triton kernels and the cuda backend. Without a GPU they run under the Triton
interpreter on the CPU.

TRITON_INTERPRET must be in the environment before anything imports triton (kernels decorated
with @triton.jit pick the interpreter when they are defined), hence this block at the very top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]  # nothing here can run without triton


def pytest_configure(config):
    # the interpreter turns runtime loop bounds into ints through a numpy conversion it deprecates
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels' tensors live: the GPU, or the CPU under the Triton interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def on_gpu(device) -> bool:
    return device.type == "cuda"
