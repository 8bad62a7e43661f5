"""The cpu backend's compiled gated activations (splitfuse.native._cpu_activations) against the
plain-torch reference ops, and the fallback to those ops when the kernels are not there."""

from __future__ import annotations

import pytest
import torch

from splitfuse.backends import Backend, torch_ops
from splitfuse.backends.cpu import CpuBackend, native_ops
from splitfuse.testing.conformance.tolerances import assert_close

OPS = {
    "silu": lambda b, x: b.silu_and_mul(x),
    "gelu": lambda b, x: b.gelu_and_mul(x, "none"),
    "gelu_tanh": lambda b, x: b.gelu_and_mul(x, "tanh"),
}


@pytest.fixture(scope="module")
def cpu():
    if native_ops.load_activations() is None:  # built at install time: a missing build is a failure
        pytest.fail("the native activations are not there: "
                    f"{native_ops.native.unavailable_reason(native_ops.ACTIVATIONS_MODULE)}")
    return CpuBackend()


def gate_up(shape, dtype, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", sorted(OPS))
def test_matches_the_reference(cpu, op, dtype):
    # 37 rows of I = 83: a vectorised run and a scalar tail per row, more than one chunk
    x = gate_up((37, 2 * 83), dtype)
    got, want = OPS[op](cpu, x), OPS[op](Backend(), x)
    assert got.shape == (37, 83) and got.dtype == dtype
    assert_close(got, want, dtype, op)


def test_fp32_silu_is_bit_identical_to_torch_on_avx2(cpu):
    # the kernel computes exp as torch's AVX2 fp32 silu does; with other torch kernels (AVX-512) the
    # last bit may differ
    x = gate_up((64, 2 * 1003), torch.float32)
    got, want = cpu.silu_and_mul(x), torch_ops.silu_and_mul(x)
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        assert torch.equal(got, want)
    else:
        assert_close(got, want, torch.float32, "silu")


@pytest.mark.parametrize("op", sorted(OPS))
def test_same_result_with_one_and_two_threads(cpu, op):
    x = gate_up((1100, 2 * 256), torch.bfloat16)  # 1100 x 256 outputs: above 2**18, rows run in parallel
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS[op](cpu, x)
        torch.set_num_threads(2)
        two = OPS[op](cpu, x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_leading_dims_and_empty_batches(cpu):
    x = gate_up((2, 3, 2 * 16), torch.float32)
    assert_close(cpu.silu_and_mul(x), torch_ops.silu_and_mul(x), torch.float32, "silu")
    assert cpu.silu_and_mul(torch.empty(0, 8)).shape == (0, 4)


def test_layouts_the_kernel_does_not_take_use_the_reference(cpu, monkeypatch):
    called = []
    monkeypatch.setattr(native_ops.NativeActivations, "gated_and_mul",
                        lambda self, x, act: called.append(act))
    x = gate_up((4, 2 * 8), torch.float32)
    assert torch.equal(cpu.silu_and_mul(x), torch_ops.silu_and_mul(x))  # kernel said None: reference
    assert called == ["silu"]
    strided = gate_up((4, 2 * 16), torch.float32)[:, :16]  # non-contiguous rows
    assert native_ops.load_activations().gated_and_mul(strided, "silu") is None
    assert native_ops.load_activations().gated_and_mul(gate_up((4, 7), torch.float32), "silu") is None


def test_without_the_kernels_the_backend_runs_the_reference(monkeypatch):
    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")
    backend = CpuBackend()
    assert backend._activations is None
    x = gate_up((5, 2 * 12), torch.float32)
    assert torch.equal(backend.silu_and_mul(x), torch_ops.silu_and_mul(x))
    assert torch.equal(backend.gelu_and_mul(x, "tanh"), torch_ops.gelu_and_mul(x, "tanh"))


def test_bad_arguments_raise_naming_them(cpu):
    from splitfuse import native

    module = native.load(native_ops.ACTIVATIONS_MODULE)
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="activation 7"):
        module.gated_and_mul(0, 7, x.data_ptr(), x.data_ptr(), 2, 4)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        module.gated_and_mul(0, 0)
