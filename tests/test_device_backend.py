"""DeviceBackend, the base of the cuda and xpu backends: KV-cache sizing from device memory, dtype
and description, and the CPU test-mode flags, each checked for both backends through the one
code path with a fake torch device module standing in for torch.cuda / torch.xpu."""

from __future__ import annotations

import types

import pytest
import torch

from splitfuse.backends.cuda import CudaBackend
from splitfuse.backends.device_backend import DeviceBackend, activation_reserve, env_flag
from splitfuse.backends.xpu import XpuBackend, kernels
from splitfuse.config import EngineConfig

GIB = 1 << 30
LLAMA_8B_BLOCK = 2 * 32 * 16 * 8 * 128 * 2  # bytes of a 16-token block: 32 layers, 8 kv heads, D 128, bf16


class FakeDeviceModule:
    """What the device backends call on torch.cuda / torch.xpu, for a device that is not here."""

    def __init__(self, total: int, used: int, name: str = "Fake GPU", bf16: bool = True,
                 has_mem_get_info: bool = True) -> None:
        self.total, self.used, self.name, self.bf16 = total, used, name, bf16
        self.calls: list[str] = []
        if has_mem_get_info:  # some XPU drivers cannot report free memory: the attribute is missing
            self.mem_get_info = lambda device=None: (total - used, total)

    def set_device(self, device):
        self.calls.append(f"set_device {device}")

    def synchronize(self, device=None):
        self.calls.append(f"synchronize {device}")

    def empty_cache(self):
        self.calls.append("empty_cache")

    def is_bf16_supported(self):
        return self.bf16

    def get_device_properties(self, device=None):
        return types.SimpleNamespace(name=self.name, total_memory=self.total)

    def memory_reserved(self, device=None):
        return self.used

    def memory_allocated(self, device=None):
        return self.used // 2


@pytest.fixture(autouse=True)
def on_the_device(monkeypatch):
    """Neither backend in its CPU test mode, and xpu without Triton's Intel backend (torch ops)."""
    for name in ("TRITON_INTERPRET", "SPLITFUSE_XPU_ON_CPU", kernels.KERNELS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kernels, "triton_has_xpu_backend", lambda: False)


BACKENDS = [pytest.param(CudaBackend, "GPU", id="cuda"), pytest.param(XpuBackend, "XPU", id="xpu")]


@pytest.mark.parametrize("cls, memory", BACKENDS)
def test_kv_cache_from_device_memory(cls, memory, caplog):
    module = FakeDeviceModule(total=80 * GIB, used=20 * GIB)
    backend = cls(device_index=0, device_module=module)
    assert backend.device == torch.device(cls.device_kind, 0)
    assert module.calls == [f"set_device {cls.device_kind}:0"]
    config = EngineConfig(gpu_memory_utilization=0.9, token_budget=768)
    with caplog.at_level("INFO", logger="splitfuse"):
        blocks = backend.num_kv_blocks(config, LLAMA_8B_BLOCK, 4096)
    # 90% of 80 GiB = 72 GiB, less 20 GiB in use, less 1 GiB + 768 x 4096 x 32 B (96 MiB) reserve:
    # 50.906 GiB of 2-MiB blocks
    assert blocks == 26064
    assert f"{cls.name} KV cache: 26064 blocks (50.91 GiB) from 80.0 GiB total, 20.00 GiB in use" in caplog.text
    assert module.calls[-2:] == [f"synchronize {cls.device_kind}:0", "empty_cache"]


@pytest.mark.parametrize("cls, memory", BACKENDS)
def test_nothing_fits_names_gpu_memory_utilization(cls, memory):
    backend = cls(device_module=FakeDeviceModule(total=16 * GIB, used=3 * GIB))
    with pytest.raises(RuntimeError) as error:
        backend.num_kv_blocks(EngineConfig(gpu_memory_utilization=0.25, token_budget=256), 1 << 20, 2048)
    assert str(error.value) == (
        f"no {memory} memory left for the KV cache: 25% of 16.0 GiB minus 3.00 GiB in use "
        f"(torch.{cls.device_kind}.mem_get_info) and a 1.02 GiB activation reserve leaves -0.02 GiB; "
        "raise gpu_memory_utilization, lower token_budget or set num_kv_blocks")


def test_xpu_without_mem_get_info_sizes_from_this_process():
    module = FakeDeviceModule(total=16 * GIB, used=3 * GIB, has_mem_get_info=False)
    backend = XpuBackend(device_module=module)
    blocks = backend.num_kv_blocks(EngineConfig(gpu_memory_utilization=0.8, token_budget=256), 1 << 20, 2048)
    assert blocks == int(0.8 * 16 * 1024) - 3 * 1024 - 1024 - 16  # MiB: 80% of 16 GiB, used, 1 GiB + 16 MiB reserve


def test_activation_reserve():
    assert activation_reserve(768, 4096) == GIB + 96 * (1 << 20)  # the 8B-model figure in the comment


@pytest.mark.parametrize("cls, memory", BACKENDS)
def test_dtype_and_description(cls, memory):
    backend = cls(device_module=FakeDeviceModule(total=80 * GIB, used=0, name="Accelerator X"))
    assert backend.default_dtype() == torch.bfloat16
    assert cls(device_module=FakeDeviceModule(80 * GIB, 0, bf16=False)).default_dtype() == torch.float16
    ops = "; kernels: torch" if cls is XpuBackend else ""
    assert backend.describe() == f"{cls.name} (Accelerator X, 80 GiB, device 0{ops})"
    assert backend.kv_block_size(64) == 32 and backend.kv_block_size(128) == 16
    backend.synchronize()
    assert backend.device_module.calls[-1] == f"synchronize {cls.device_kind}:0"


@pytest.mark.parametrize("cls, env", [(CudaBackend, "TRITON_INTERPRET"), (XpuBackend, "SPLITFUSE_XPU_ON_CPU")])
def test_cpu_test_mode_flag(monkeypatch, cls, env):
    assert cls.cpu_mode_env == env
    assert cls.device_type() == cls.device_kind and cls.auto_selectable()
    monkeypatch.setenv(env, "1")
    assert cls.cpu_mode() and cls.device_type() == "cpu" and not cls.auto_selectable() and cls.device_count() == 1
    if cls is XpuBackend:  # the cuda backend's CPU mode needs the kernels to be defined interpreted
        backend = cls()
        assert backend.device == torch.device("cpu") and backend.default_dtype() == torch.float32


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("YES", True), (" on ", True), ("2", True),
    ("0", False), ("", False), ("false", False), ("No", False), ("off", False), (None, False),
])
def test_env_flag(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("SPLITFUSE_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("SPLITFUSE_TEST_FLAG", value)
    assert env_flag("SPLITFUSE_TEST_FLAG") is expected


def test_both_backends_are_thin_device_backends():
    assert issubclass(CudaBackend, DeviceBackend) and issubclass(XpuBackend, DeviceBackend)
    shared = ("num_kv_blocks", "default_dtype", "kv_block_size", "describe", "write_kv", "rotary_write_kv",
              "rms_norm", "warm_up", "forward", "prepare_batch")
    for cls in (CudaBackend, XpuBackend):
        assert not [name for name in shared if name in vars(cls)], f"{cls.name} repeats the base"


def test_graph_capture_failure_keeps_decode_eager(caplog):
    """warm_up captures decode graphs on the device; a capture that fails (here: no CUDA to hold
    the static buffers) must not fail start-up: a warning, and steps run op by op."""
    module = FakeDeviceModule(total=80 * GIB, used=0)
    backend = CudaBackend(device_module=module)
    assert backend.captures_graphs() and not XpuBackend(device_module=module).captures_graphs()
    config = EngineConfig(max_seqs=4, token_budget=16)
    with caplog.at_level("WARNING", logger="splitfuse"):
        backend.warm_up(object(), [], config, max_model_len=64, block_size=16)
    assert backend._graphs is None
    assert "cuda graph capture failed, decode steps run eagerly (enforce_eager=True hides this)" in caplog.text
    assert module.calls[-1] == "synchronize cuda:0"
    caplog.clear()
    backend.warm_up(object(), [], EngineConfig(enforce_eager=True), max_model_len=64, block_size=16)
    assert backend._graphs is None and caplog.text == ""
