"""The native-kernel loader: a missing, foreign or turned-off module is None with a one-line reason."""

import sys
import types
from pathlib import Path

import pytest

from splitfuse import native
from splitfuse.native.cpu_tag import cpu_tag


@pytest.fixture(autouse=True)
def native_enabled(monkeypatch):
    # these tests are about the loader itself, whatever SPLITFUSE_NATIVE the run was given
    monkeypatch.delenv("SPLITFUSE_NATIVE", raising=False)


@pytest.fixture
def fake_module(monkeypatch):
    def install(tag: str):
        module = types.ModuleType("splitfuse.native._fake")
        module.BUILD_TAG = tag
        monkeypatch.setitem(sys.modules, "splitfuse.native._fake", module)
        native._import.cache_clear()
        return module

    yield install
    native._import.cache_clear()


def test_a_module_built_here_loads(fake_module):
    module = fake_module(cpu_tag())
    assert native.load("fake") is module
    assert native.unavailable_reason("fake") == ""


def test_a_module_built_for_a_named_instruction_set_loads_anywhere(fake_module):
    module = fake_module("march=x86-64-v3")
    assert native.load("fake") is module


def test_a_module_built_for_another_cpu_is_refused_with_the_fix(fake_module):
    fake_module("0123456789ab")
    assert native.load("fake") is None
    reason = native.unavailable_reason("fake")
    assert "built for another CPU" in reason and "reinstall splitfuse" in reason


def test_a_module_that_was_never_built_says_so():
    native._import.cache_clear()
    assert native.load("no_such_kernels") is None
    assert "is not built" in native.unavailable_reason("no_such_kernels")


def test_turning_native_kernels_off_hides_even_a_good_module(fake_module, monkeypatch):
    fake_module(cpu_tag())
    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")
    assert native.load("fake") is None
    assert native.unavailable_reason("fake") == "turned off (SPLITFUSE_NATIVE=0)"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mapped libraries (Linux)")
def test_the_kernels_share_torchs_openmp_runtime():
    # two OpenMP runtimes would mean two thread pools spinning against each other on the same cores
    loaded = [name for name in ("cpu_attention", "quant_linear", "sampling") if native.load(name) is not None]
    assert loaded, native.unavailable_reason("cpu_attention")
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes
