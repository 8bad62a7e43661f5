"""The cpu backend's dense bf16/fp16 linear (splitfuse.backends.cpu.dense_linear): every path
against the float32 product, which path runs where, and the fallback without the native kernel."""

import types

import pytest
import torch
import torch.nn.functional as F

from splitfuse import native
from splitfuse.backends.cpu import CpuBackend, dense_linear

needs_native = pytest.mark.skipif(native.load("dense_linear") is None,
                                  reason=f"native kernels: {native.unavailable_reason('dense_linear')}")

# Every path sums in float32 and rounds once, so each output is the float32 product (up to its
# summation order, ~1e-6 here) rounded to the dtype: at most half an ulp, 2^-8 (bf16) or 2^-11
# (fp16) of the value; the atol covers values near zero that differ in summation order only.
TOLERANCE = {torch.bfloat16: dict(rtol=2 ** -8, atol=1e-4), torch.float16: dict(rtol=2 ** -11, atol=1e-4)}
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bfloat16", "float16"]
ROWS = [1, 2, 3, 5, 9, 33, 300]
SHAPES = [(37, 29), (16, 64), (5, 8)]  # (N, K): odd sizes, tails shorter than a vector, a whole vector


def _case(M: int, N: int, K: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed * 7919 + M * 131 + N * 17 + K)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    return x, w, b


def _reference(x, w, b=None):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def _check(got, x, w, b=None):
    assert got.dtype == x.dtype and got.shape == x.shape[:-1] + (w.shape[0],)
    torch.testing.assert_close(got.float(), _reference(x, w, b), **TOLERANCE[x.dtype])


# ---- each path against the float32 product ----------------------------------------------------
@needs_native
@pytest.mark.parametrize("vectorized", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [m for m in ROWS if m <= 64])
@pytest.mark.parametrize("N,K", SHAPES)
def test_streaming_kernel_matches_the_float32_product(N, K, M, dtype, vectorized):
    x, w, b = _case(M, N, K, dtype)
    _check(dense_linear.stream_linear(x, w, b, vectorized=vectorized), x, w, b)
    _check(dense_linear.stream_linear(x, w, vectorized=vectorized), x, w)


@needs_native
@pytest.mark.parametrize("vectorized", [True, False], ids=["avx2", "portable"])
def test_streaming_kernel_takes_float32_inputs_with_a_bf16_weight(vectorized):
    x, w, b = _case(5, 37, 29, torch.bfloat16)
    x32, b32 = torch.randn(5, 29, generator=torch.Generator().manual_seed(3)), b.float()
    got = dense_linear.stream_linear(x32, w, b32, vectorized=vectorized)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x32, w.float(), b32), rtol=1e-5, atol=1e-5)  # summation order only


@pytest.mark.parametrize("chunk_values", [1 << 21, 64], ids=["whole", "chunked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N,K", SHAPES)
def test_upcast_matches_the_float32_product(N, K, M, dtype, chunk_values):
    x, w, b = _case(M, N, K, dtype)
    _check(dense_linear.upcast_linear(x, w, b, chunk_values=chunk_values), x, w, b)
    _check(dense_linear.upcast_linear(x, w, chunk_values=chunk_values), x, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", ROWS)
def test_backend_linear_takes_3d_and_non_contiguous_inputs(M, dtype):
    x, w, b = _case(M, 37, 29, dtype)
    x3 = x.reshape(1, M, 29)
    _check(CpuBackend().linear(x3, w, b), x3, w, b)
    wide = torch.cat([x, x], dim=-1)[:, ::2]  # strided along K
    assert not wide.is_contiguous()
    _check(CpuBackend().linear(wide, w, b), wide, w, b)
    # a transposed weight (not contiguous) is still multiplied correctly
    w_t = w.t().contiguous().t()
    _check(CpuBackend().linear(x, w_t), x, w_t)


def test_float32_runs_torchs_linear_unchanged():
    x, w, b = _case(300, 37, 29, torch.float32)
    assert torch.equal(CpuBackend().linear(x, w, b), F.linear(x, w, b))


def test_a_wrong_input_width_names_both_sizes():
    x, w, _ = _case(3, 37, 29, torch.bfloat16)
    with pytest.raises(ValueError, match="x has 30 input features; the weight expects 29"):
        dense_linear.upcast_linear(torch.zeros(3, 30, dtype=torch.bfloat16), w)


@needs_native
def test_the_kernel_refuses_more_rows_than_it_takes():
    x, w, _ = _case(65, 5, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="expected 0 <= M <= 64"):
        dense_linear.stream_linear(x, w)


@needs_native
@pytest.mark.parametrize("M", [1, 4, 33])
def test_streaming_kernel_gives_the_same_bits_with_1_and_2_threads(M, monkeypatch):
    monkeypatch.setattr(dense_linear, "STREAM_PARALLEL_MIN_VALUES", 0)  # small weights run on one thread
    x, w, b = _case(M, 101, 264, torch.bfloat16)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(dense_linear.stream_linear(x, w, b))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*results)


# ---- which path runs -----------------------------------------------------------------------------
AVX2 = frozenset({"avx2", "fma", "f16c"})


@pytest.mark.parametrize("dtype,flag", [(torch.bfloat16, "avx512_bf16"), (torch.bfloat16, "amx_bf16"),
                                        (torch.float16, "avx512_fp16"), (torch.float16, "amx_fp16")])
def test_cpus_with_native_dot_products_keep_torchs_matmul(dtype, flag):
    for rows in (1, 32, 300):
        assert dense_linear.choose(dtype, rows, flags=AVX2 | {flag}, has_kernel=True,
                                   force_torch=False) == dense_linear.TORCH
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    assert dense_linear.choose(other, 1, flags=AVX2 | {flag}, has_kernel=True, force_torch=False) == dense_linear.STREAM


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_without_native_dot_products_rows_pick_the_path(dtype):
    def choose(rows, has_kernel):
        return dense_linear.choose(dtype, rows, flags=AVX2, has_kernel=has_kernel, force_torch=False)

    stream_max, upcast_min = dense_linear.STREAM_MAX_ROWS, dense_linear.UPCAST_MIN_ROWS
    assert [choose(r, True) for r in (1, stream_max, stream_max + 1, 300)] == ["stream", "stream", "upcast", "upcast"]
    assert [choose(r, False) for r in (1, upcast_min - 1, upcast_min, 300)] == ["torch", "torch", "upcast", "upcast"]
    assert dense_linear.choose(torch.float32, 300, flags=AVX2, has_kernel=True, force_torch=False) == "torch"
    assert dense_linear.choose(dtype, 300, flags=AVX2, has_kernel=True, force_torch=True) == "torch"


def test_the_environment_variable_forces_torchs_matmul(monkeypatch):
    monkeypatch.setattr(dense_linear, "cpu_flags", lambda: AVX2)
    monkeypatch.setenv(dense_linear.ENV, "torch")
    assert dense_linear.choose(torch.bfloat16, 300) == "torch"
    monkeypatch.setenv(dense_linear.ENV, "fast")
    with pytest.raises(ValueError, match="SPLITFUSE_CPU_DENSE_LINEAR must be 'auto' or 'torch'; got 'fast'"):
        dense_linear.choose(torch.bfloat16, 300)


@pytest.fixture
def spies(monkeypatch):
    """Which of the two new paths backend.linear called, per call (torch's path calls neither)."""
    calls = []
    for name in ("stream_linear", "upcast_linear"):
        real = getattr(dense_linear, name)
        monkeypatch.setattr(dense_linear, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    return calls


@pytest.mark.parametrize("flags,env,expected", [
    (AVX2, "auto", ["stream_linear", "upcast_linear"]),
    (AVX2 | {"avx512_bf16"}, "auto", []),
    (AVX2, "torch", []),
], ids=["avx2", "avx512_bf16", "forced"])
def test_backend_linear_runs_the_chosen_path(monkeypatch, spies, flags, env, expected):
    if native.load("dense_linear") is None:
        expected = [c for c in expected if c != "stream_linear"]
    monkeypatch.setattr(dense_linear, "cpu_flags", lambda: flags)
    monkeypatch.setenv(dense_linear.ENV, env)
    backend = CpuBackend()
    for M in (1, 300):
        x, w, b = _case(M, 37, 29, torch.bfloat16)
        _check(backend.linear(x, w, b), x, w, b)
    assert spies == expected


def test_without_the_native_kernel_few_rows_run_torch_and_more_the_upcast(monkeypatch, spies):
    monkeypatch.setattr(native, "load", lambda name: None)
    monkeypatch.setattr(dense_linear, "cpu_flags", lambda: AVX2)
    monkeypatch.setenv(dense_linear.ENV, "auto")
    backend = CpuBackend()
    for M in (1, dense_linear.UPCAST_MIN_ROWS, 300):
        x, w, b = _case(M, 37, 29, torch.bfloat16)
        _check(backend.linear(x, w, b), x, w, b)
    assert spies == ["upcast_linear", "upcast_linear"]


def test_turning_native_kernels_off_skips_the_streaming_kernel(monkeypatch, spies):
    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")
    monkeypatch.setattr(dense_linear, "cpu_flags", lambda: AVX2)
    x, w, b = _case(3, 37, 29, torch.float16)
    _check(CpuBackend().linear(x, w, b), x, w, b)
    assert spies == []


# ---- what describe() says --------------------------------------------------------------------------
def _warmed(dtype):
    backend = CpuBackend()
    backend.warm_up(types.SimpleNamespace(dtype=dtype), [], None, 64, 16)
    return backend


def test_describe_names_the_half_precision_linear_path_of_the_model(monkeypatch):
    monkeypatch.setattr(dense_linear, "cpu_flags", lambda: AVX2)
    monkeypatch.setenv(dense_linear.ENV, "auto")
    assert "linear" not in _warmed(torch.float32).describe()
    kernel = native.load("dense_linear") is not None
    expected = ("bfloat16 linear: native streaming kernel up to 32 rows, fp32 upcast above" if kernel else
                "bfloat16 linear: torch's matmul below 16 rows, fp32 upcast from there")
    assert _warmed(torch.bfloat16).describe().endswith(f", {expected})")
    monkeypatch.setattr(native, "load", lambda name: None)
    assert _warmed(torch.float16).describe().endswith(
        ", float16 linear: torch's matmul below 16 rows, fp32 upcast from there)")
    monkeypatch.setattr(dense_linear, "cpu_flags", lambda: AVX2 | {"amx_bf16"})
    assert _warmed(torch.bfloat16).describe().endswith(
        ", bfloat16 linear: torch's matmul (native bfloat16 dot products))")
    monkeypatch.setenv(dense_linear.ENV, "torch")
    assert _warmed(torch.bfloat16).describe().endswith(
        ", bfloat16 linear: torch's matmul (SPLITFUSE_CPU_DENSE_LINEAR=torch))")


def test_cpu_flags_are_read_once_per_process():
    assert dense_linear.cpu_flags() is dense_linear.cpu_flags()


def test_splitfuse_backends_says_how_bfloat16_linears_run(monkeypatch, capsys):
    from splitfuse.cli import main

    monkeypatch.setattr(dense_linear, "cpu_flags", lambda: AVX2)
    monkeypatch.setenv(dense_linear.ENV, "torch")
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cpu = next(i for i, line in enumerate(lines) if line.startswith("cpu "))
    assert lines[cpu + 1].split() == "bfloat16 linear: torch's matmul (SPLITFUSE_CPU_DENSE_LINEAR=torch)".split()
