"""The cpu backend's compiled RMSNorm and rotary at sizes where they run in parallel, and the shapes
their wrappers hand back to the plain-torch reference ops."""

from __future__ import annotations

import pytest
import torch

from splitfuse.backends import Backend
from splitfuse.backends.cpu import CpuBackend, native_ops
from splitfuse.backends.torch_ops import build_cos_sin_cache

# cpu_attention.cpp runs rotary and rms_norm in parallel above 2**18 elements; these sizes are above it
PARALLEL_ROWS = 2200  # x 128 features
PARALLEL_TOKENS = 1400  # x (4 + 2) heads x 32


@pytest.fixture(scope="module")
def cpu():
    if native_ops.load() is None:  # built at install time: a missing build is a failure, not a skip
        pytest.fail(f"the native kernels are not there: {native_ops.unavailable_reason()}")
    return CpuBackend()


def with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def qkv_views(T, H=4, Hkv=2, D=32, dtype=torch.float32, seed=0):
    """q, k, v as views of one fused projection (the models' layout), positions and a cos/sin table."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen).to(dtype)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    cos_sin = build_cos_sin_cache(1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), 256).to(dtype)
    positions = torch.randint(0, 256, (T,), generator=gen)
    return q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D), positions, cos_sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parallel_rms_norm_equals_one_thread_and_the_reference(cpu, dtype):
    gen = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(PARALLEL_ROWS, 128, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(128, generator=gen).to(dtype)
    one = with_threads(1, lambda: cpu.rms_norm(x, weight, 1e-6, residual))
    two = with_threads(2, lambda: cpu.rms_norm(x, weight, 1e-6, residual))
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert torch.equal(two[1], Backend().rms_norm(x, weight, 1e-6, residual)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parallel_rotary_write_kv_equals_one_thread_and_the_reference(cpu, dtype):
    q, k, v, positions, cos_sin = qkv_views(PARALLEL_TOKENS, dtype=dtype)
    slots = torch.randperm(2 * PARALLEL_TOKENS, generator=torch.Generator().manual_seed(2))[:PARALLEL_TOKENS]

    def run(backend):
        cache = torch.zeros(2, 2 * PARALLEL_TOKENS // 16, 16, 2, 32, dtype=dtype)
        return backend.rotary_write_kv(q, k, v, positions, cos_sin, cache, slots), cache

    (q1, kv1), (q2, kv2) = with_threads(1, lambda: run(cpu)), with_threads(2, lambda: run(cpu))
    assert torch.equal(q1, q2) and torch.equal(kv1, kv2)
    q_ref, kv_ref = run(Backend())
    assert torch.equal(q2, q_ref) and torch.equal(kv2, kv_ref)


def test_rms_norm_hands_shapes_it_does_not_take_to_the_reference(cpu):
    kernels = native_ops.load()
    x = torch.randn(3, 16)
    assert kernels.rms_norm(x, torch.randn(15), 1e-6, None, 0.0) is None  # weight of another length
    assert kernels.rms_norm(x, torch.randn(16), 1e-6, torch.randn(3, 8, 2), 0.0) is None  # residual's shape
    assert kernels.rms_norm(x.t(), torch.randn(3), 1e-6, None, 0.0) is None  # not contiguous
    assert kernels.rms_norm(torch.empty(0, 16), torch.randn(16), 1e-6, None, 0.0) is None
    assert kernels.rms_norm(torch.tensor(1.0), torch.randn(1), 1e-6, None, 0.0) is None  # no feature dim
    empty = cpu.rms_norm(torch.empty(0, 16), torch.randn(16), 1e-6)
    assert empty.shape == (0, 16)


def test_rms_norm_of_leading_dims_keeps_the_shape(cpu):
    gen = torch.Generator().manual_seed(3)
    x, residual = torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    weight = torch.randn(16, generator=gen)
    normed, total = cpu.rms_norm(x, weight, 1e-6, residual)
    expected, expected_total = Backend().rms_norm(x, weight, 1e-6, residual)
    assert normed.shape == total.shape == (2, 3, 16)
    assert torch.equal(total, expected_total)
    torch.testing.assert_close(normed, expected, rtol=1e-6, atol=1e-6)
