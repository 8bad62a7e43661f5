"""The native weight-only int8/int4 linear of the cpu backend (splitfuse.native._quant_linear)
against the dequantized float32 matmul, and the torch fallback when the module is absent."""

import pytest
import torch

from splitfuse import native
from splitfuse.backends.cpu import CpuBackend, quantized
from splitfuse.quant import quantize
from splitfuse.quant.weights import quantize_int4

needs_native = pytest.mark.skipif(native.load("quant_linear") is None,
                                  reason=f"native kernels: {native.unavailable_reason('quant_linear')}")

# Outputs have magnitude ~1 (weights scaled by K^-0.5). float32 differs from the reference only in
# summation order (and int4's zero point applied through group sums of x); bfloat16 also rounds the
# output (2^-9) and, in the reference, nothing else: x is bf16 on both sides.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}
# (N, K, group_size): N not a multiple of the 4-row blocks, K not a multiple of the vector width or
# of int4's 32-value blocks (K=90: one group of 90, a 26-value tail), int4 groups of 32, 64, 128,
# 192 and 256 (groups of a multiple of 64 read 64-value blocks; one row of x reads groups of 64, 128
# and 256 through code compiled for that size, 192 through the general loop)
INT4_SHAPES = [(13, 96, 32), (9, 192, 64), (6, 384, 128), (5, 90, 90), (7, 384, 192), (10, 512, 256)]
INT8_SHAPES = [(13, 36), (9, 200), (6, 384)]
ROWS = [1, 2, 3, 5, 9]  # up to 4 rows stream the weights; more dequantize a block of rows once


def _weight(N: int, K: int) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(N * 1000 + K)) * K ** -0.5


def _x(M: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)


def _reference(x: torch.Tensor, weight, bias=None) -> torch.Tensor:
    out = x.float() @ weight.dequantize(torch.float32).T
    return out if bias is None else out + bias.float()


@needs_native
@pytest.mark.parametrize("vectorized", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N,K,group_size", INT4_SHAPES)
def test_int4_kernel_matches_the_dequantized_matmul(N, K, group_size, M, dtype, vectorized):
    weight = quantize_int4(_weight(N, K), group_size)
    x = _x(M, K, dtype)
    got = quantized.native_int4_mm(x, weight.data, weight.scales, weight.zeros, group_size, vectorized=vectorized)
    assert got.shape == (M, N) and got.dtype == dtype
    torch.testing.assert_close(got.float(), _reference(x, weight), **TOLERANCE[dtype])


@needs_native
@pytest.mark.parametrize("vectorized", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N,K", INT8_SHAPES)
def test_int8_kernel_matches_the_dequantized_matmul(N, K, M, dtype, vectorized):
    weight = quantize(_weight(N, K), "int8")
    x = _x(M, K, dtype)
    got = quantized.native_int8_mm(x, weight.data, weight.scales, K, vectorized=vectorized)
    assert got.shape == (M, N) and got.dtype == dtype
    torch.testing.assert_close(got.float(), _reference(x, weight), **TOLERANCE[dtype])


@needs_native
@pytest.mark.parametrize("M", [1, 6])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int8_kernel_takes_group_wise_scales(group_size, M):
    N, K = 7, 128
    data = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N, K // group_size) * 0.01 + 0.001
    x = _x(M, K, torch.float32)
    expected = x @ (data.float() * scales.repeat_interleave(group_size, dim=1)).T
    torch.testing.assert_close(quantized.native_int8_mm(x, data, scales, group_size), expected, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("M", [1, 3, 7])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_one_and_two_threads_give_identical_results(fmt, M):
    weight = CpuBackend().prepare_linear_weight(quantize(_weight(37, 256), fmt))
    x = _x(M, 256, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CpuBackend().linear(x, weight)
        torch.set_num_threads(2)
        two = CpuBackend().linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cpu_backend_runs_the_native_kernel_on_the_portable_layout(monkeypatch, fmt, dtype):
    calls = []
    kernel = quantized.run_native
    monkeypatch.setattr(quantized, "run_native", lambda call, *a: calls.append(call.format) or kernel(call, *a))
    backend = CpuBackend()
    weight = quantize(_weight(48, 256).to(dtype), fmt)
    prepared = backend.prepare_linear_weight(weight)
    assert prepared.layout == "rows" and prepared.scales.dtype == torch.float32
    assert prepared.nbytes == weight.nbytes  # nothing repacked or duplicated
    x, bias = torch.randn(2, 3, 256).to(dtype), torch.randn(48).to(dtype)  # leading dimensions are kept
    got = backend.linear(x, prepared, bias)
    assert got.shape == (2, 3, 48) and got.dtype == dtype
    torch.testing.assert_close(got.float(), _reference(x, weight, bias), **TOLERANCE[dtype])
    assert calls == [fmt]


@needs_native
def test_a_width_mismatch_is_refused_naming_both_widths():
    weight = CpuBackend().prepare_linear_weight(quantize(_weight(16, 64), "int8"))
    with pytest.raises(ValueError, match="x has 32 input features; the weight .* expects 64"):
        CpuBackend().linear(torch.randn(1, 32), weight)


@pytest.mark.parametrize("fmt,torch_layout", [("int8", "rows"), ("int4", "cpu_int4pack")])
def test_without_the_native_module_torch_kernels_take_over(monkeypatch, fmt, torch_layout):
    monkeypatch.setattr(quantized, "native_kernels", lambda: None)
    backend = CpuBackend()
    weight = quantize(_weight(48, 256), fmt)
    prepared = backend.prepare_linear_weight(weight)
    assert prepared.layout == torch_layout
    x = torch.randn(3, 256)
    torch.testing.assert_close(backend.linear(x, prepared), _reference(x, weight), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_natively_prepared_weight_still_multiplies_with_native_kernels_turned_off(monkeypatch, fmt):
    backend = CpuBackend()
    weight = quantize(_weight(48, 256), fmt)
    prepared = backend.prepare_linear_weight(weight)
    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")
    x = torch.randn(3, 256)
    torch.testing.assert_close(backend.linear(x, prepared), _reference(x, weight), rtol=1e-4, atol=1e-4)


@needs_native
def test_a_prepared_matrix_works_out_its_kernel_arguments_once_and_still_honours_turning_them_off(monkeypatch):
    made, ran = [], []
    make, run = quantized.native_call, quantized.run_native
    monkeypatch.setattr(quantized, "native_call", lambda *a: made.append(1) or make(*a))
    monkeypatch.setattr(quantized, "run_native", lambda *a: ran.append(1) or run(*a))
    backend = CpuBackend()
    weight = quantize(_weight(48, 256), "int4")
    prepared = backend.prepare_linear_weight(weight)
    x = torch.randn(1, 256)
    for _ in range(3):
        torch.testing.assert_close(backend.linear(x, prepared), _reference(x, weight), rtol=1e-5, atol=1e-5)
    assert (len(made), len(ran)) == (1, 3)
    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")
    torch.testing.assert_close(backend.linear(x, prepared), _reference(x, weight), rtol=1e-4, atol=1e-4)
    assert len(ran) == 3
