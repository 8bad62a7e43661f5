"""Weight-only quantization: the quantizers' error bounds, the cpu kernels against the dequantized
reference, and whole tiny models quantized at load against the same engine holding the
dequantized matrices as plain float32 tensors."""

from __future__ import annotations

import dataclasses
import logging

import pydantic
import pytest
import torch

import splitfuse
from splitfuse.backends import Backend, create_backend, fp8_linear, torch_ops
from splitfuse.backends.cpu import CpuBackend, quantized
from splitfuse.cli import main
from splitfuse.config import EngineConfig
from splitfuse.quant import QuantizedWeight, dequantize_model, quantize, quantize_model, weight_bytes
from splitfuse.quant.experts import ExpertWeights
from splitfuse.quant.weights import int4_group_size, unpack_int4
from splitfuse.testing.parity import make_prompts
from splitfuse.testing.tiny_model import make_tiny_model


def _weight(N: int, K: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- quantizers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K", [(33, 41), (1, 8), (64, 256)])
def test_int8_round_trip_is_within_half_a_step_per_row(N, K):
    w = _weight(N, K)
    w[0, :3] = 0.0
    q = quantize(w, "int8")
    assert q.data.dtype == torch.int8 and q.data.shape == (N, K) and q.scales.shape == (N,)
    assert q.shape == (N, K) and q.dtype == torch.float32 and q.zeros is None
    error = (q.dequantize() - w).abs()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert (error <= step / 2 * (1 + 1e-5)).all()
    assert (q.dequantize()[0, :3] == 0).all()


@pytest.mark.parametrize("K,group", [(256, 128), (192, 64), (96, 32), (90, 90), (2, 2)])
def test_int4_group_size_rule(K, group):
    assert int4_group_size(K) == group


@pytest.mark.parametrize("N,K", [(33, 256), (5, 96), (7, 90)])
def test_int4_round_trip_is_within_half_a_step_per_group(N, K):
    w = _weight(N, K)
    w[1, 5:9] = 0.0
    q = quantize(w, "int4")
    g = q.group_size
    assert q.data.dtype == torch.uint8 and q.data.shape == (N, K // 2)
    assert q.scales.shape == q.zeros.shape == (N, K // g)
    assert int(unpack_int4(q.data).max()) <= 15 and int(q.zeros.max()) <= 15
    groups = w.view(N, K // g, g)
    step = (groups.amax(2).clamp_min(0) - groups.amin(2).clamp_max(0)) / 15
    error = (q.dequantize() - w).abs().view(N, K // g, g)
    assert (error <= step[..., None] / 2 * (1 + 1e-5) + 1e-7).all()
    assert (q.dequantize()[1, 5:9] == 0).all(), "a zero weight stays exactly zero (integer zero point)"


def test_dequantize_returns_the_source_dtype_by_default():
    q = quantize(_weight(16, 64, torch.bfloat16), "int4")
    assert q.dequantize().dtype == torch.bfloat16 and q.dequantize(torch.float32).dtype == torch.float32


def test_quantized_weights_take_a_fraction_of_the_bytes():
    w = _weight(256, 512)
    full = w.numel() * w.element_size()
    assert quantize(w, "int8").nbytes < full / 3.9  # 1 byte a weight + a float32 scale per row
    assert quantize(w, "int4").nbytes < full / 7  # half a byte + scale and zero per 128 weights


@pytest.mark.parametrize("weight,message", [
    (torch.randn(4, 5), "even in_features"),
    (torch.randn(2, 4, 6), "2-D"),
    (torch.ones(4, 6, dtype=torch.int32), "floating-point"),
])
def test_unquantizable_weights_are_refused_clearly(weight, message):
    with pytest.raises(ValueError, match=message):
        quantize(weight, "int4")


def test_unknown_format_is_refused_naming_the_supported_ones():
    with pytest.raises(ValueError, match=r"'int3' is not supported; expected one of \['int8', 'int4', 'fp8'\]"):
        quantize(torch.randn(4, 8), "int3")


# ---- cpu kernels against the dequantized reference ----------------------------------------------
# (format, N, K, layout the cpu backend prepares). int8 runs torch's kernel when K is a multiple of
# 8; int4 when N is a multiple of 16 and the group is 32..256 wide. The rest takes the fallback.
CPU_CASES = [
    pytest.param("int8", 48, 256, "rows", True, id="int8-kernel"),
    pytest.param("int8", 33, 41, "rows", False, id="int8-fallback-odd-K"),
    pytest.param("int4", 48, 96, "cpu_int4pack", True, id="int4-kernel-group32"),
    pytest.param("int4", 64, 384, "cpu_int4pack", True, id="int4-kernel-group128"),
    pytest.param("int4", 33, 256, "rows", False, id="int4-fallback-N33"),
    pytest.param("int4", 16, 90, "rows", False, id="int4-fallback-one-group-of-90"),
]
# Tolerances against the float32 reference on outputs of magnitude ~1 (weights scaled by K^-0.5):
# float32 differs by summation order only; bfloat16 rounds x, the scales and the output (2^-9 each).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _kernel_calls(monkeypatch) -> list[str]:
    """Names of torch's weight-only kernels as they are called (with the native kernels off, which
    take their place when built: tests/test_cpu_quant_linear_native.py)."""
    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")
    calls = []
    int8_mm, int4_mm = torch._weight_int8pack_mm, torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append("int8") or int8_mm(*a))
    monkeypatch.setattr(quantized, "_int4_mm", lambda x, w: calls.append("int4") or int4_mm(
        x, w.data, w.group_size, w.scales.to(x.dtype)))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fmt,N,K,layout,uses_kernel", CPU_CASES)
def test_cpu_linear_matches_the_dequantized_reference(monkeypatch, fmt, N, K, layout, uses_kernel, dtype, with_bias):
    calls = _kernel_calls(monkeypatch)
    backend = CpuBackend()
    weight = quantize(_weight(N, K, dtype) * K ** -0.5, fmt)
    prepared = backend.prepare_linear_weight(weight)
    assert prepared.layout == layout
    x = torch.randn(2, 5, K).to(dtype)  # [..., K]: leading dimensions are kept
    bias = torch.randn(N).to(dtype) if with_bias else None
    got = backend.linear(x, prepared, bias)
    expected = torch_ops.linear(x.float(), weight.dequantize(torch.float32), None if bias is None else bias.float())
    assert got.shape == (2, 5, N) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype])
    assert calls == ([fmt] if uses_kernel else [])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cpu_falls_back_to_dequantize_without_torch_kernels(monkeypatch, fmt):
    monkeypatch.setattr(quantized, "has_int8_kernel", lambda: False)
    monkeypatch.setattr(quantized, "has_int4_kernel", lambda: False)
    backend = CpuBackend()
    weight = quantize(_weight(48, 256) * 0.1, fmt)
    prepared = backend.prepare_linear_weight(weight)
    assert prepared is weight  # left in the portable layout
    x = torch.randn(3, 256)
    torch.testing.assert_close(backend.linear(x, prepared), x @ weight.dequantize().T, rtol=1e-5, atol=1e-5)


def test_cpu_int4_layout_dequantizes_to_the_same_matrix(monkeypatch):
    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")  # torch's kernel's layout
    weight = quantize(_weight(32, 256), "int4")
    prepared = CpuBackend().prepare_linear_weight(weight)
    assert prepared.layout == "cpu_int4pack" and prepared.nbytes < weight.data.numel() * 2
    torch.testing.assert_close(prepared.dequantize(), weight.dequantize(), rtol=1e-6, atol=1e-6)


def test_cuda_backend_under_the_interpreter_runs_the_triton_kernels_and_matches():
    backend = create_backend("cuda")  # the Triton interpreter on the cpu (tests/conftest.py)
    reference = CpuBackend()
    x, bias = torch.randn(7, 96), torch.randn(48)
    for fmt in ("int8", "int4"):
        weight = quantize(_weight(48, 96) * 0.1, fmt)
        prepared = backend.prepare_linear_weight(weight.to(backend.device))
        assert prepared.layout == f"triton_{fmt}"
        got = backend.linear(x.to(backend.device), prepared, bias.to(backend.device))
        torch.testing.assert_close(got.cpu(), reference.linear(x, reference.prepare_linear_weight(weight), bias),
                                   rtol=1e-5, atol=1e-5)


# ---- whole models quantized at load ----------------------------------------------------------------
NEW_TOKENS = 8
TIE_TOLERANCE = 1e-3  # logit gap under which two tokens are a near-tie (as splitfuse.testing.parity)


def _greedy(pipe, prompts, logprobs: int | None = None):
    return pipe(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def _divergence(prompt_len: int, ours: list[int], reference) -> str | None:
    """None when ours equals the reference's tokens, or first differs where the reference's own
    top-2 log-probabilities (so logits) are within TIE_TOLERANCE; else a description."""
    for i, (a, b) in enumerate(zip(ours, reference.token_ids)):
        if a != b:
            top = reference.logprobs[i].top
            gap = abs(top[b] - top[a]) if a in top else float("inf")
            return None if gap < TIE_TOLERANCE else (
                f"prompt of {prompt_len} tokens diverges at token {i}: quantized {a}, dequantized reference {b} "
                f"(logit gap {gap:.3g})\n  quantized {ours}\n  reference {reference.token_ids}")
    return None


def assert_matches_dequantized_reference(path, quantization: str, backend: str = "cpu", prompts=None):
    """Greedy tokens of the model quantized at load equal those of the same engine holding the
    dequantized matrices as plain tensors (near-ties accepted); returns the quantized pipeline."""
    prompts = prompts or make_prompts()
    quantized_pipe = splitfuse.pipeline(path, backend=backend, quantization=quantization, kv_cache_gib=0.01)
    reference_pipe = splitfuse.pipeline(path, backend="cpu", kv_cache_gib=0.01)
    # the same quantization in the portable layout (no backend repacking), dequantized: a reference
    # independent of the kernels under test
    quantize_model(reference_pipe.engine.model, Backend(), quantization)
    dequantize_model(reference_pipe.engine.model)
    ours = _greedy(quantized_pipe, prompts)
    references = _greedy(reference_pipe, prompts, logprobs=2)
    problems = [_divergence(len(p), o.token_ids, r) for p, o, r in zip(prompts, ours, references)]
    problems = [p for p in problems if p]
    assert not problems, f"{quantization}: greedy output differs\n" + "\n".join(problems)
    return quantized_pipe


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_tiny_llama_quantized_at_load_matches_its_dequantized_weights(tiny_model_dir, quantization, caplog):
    path = tiny_model_dir("llama")
    with caplog.at_level(logging.INFO, logger="splitfuse"):
        pipe = assert_matches_dequantized_reference(path, quantization)
    weights = pipe.engine.model.weights
    quantized_names = sorted(n for n, w in weights.items() if isinstance(w, QuantizedWeight))
    assert quantized_names == sorted(f"layers.{i}.{m}.weight" for i in range(2) for m in ("qkv", "o", "gate_up", "down"))
    assert all(isinstance(weights[n], torch.Tensor) for n in ("embed_tokens.weight", "lm_head.weight", "norm.weight"))
    full_bytes = weight_bytes(splitfuse.pipeline(path, backend="cpu", kv_cache_gib=0.01).engine.model.weights)
    assert weight_bytes(weights) < full_bytes
    assert f"MiB ({quantization})" in caplog.text


def test_weight_bytes_shrink_with_fewer_bits(tiny_model_dir):
    sizes = {q: weight_bytes(splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", quantization=q,
                                                kv_cache_gib=0.01).engine.model.weights)
             for q in (None, "int8", "int4")}
    assert sizes[None] > sizes["int8"] > sizes["int4"]


# Every other built-in layout: each passes its matrices through `linear`, so quantization reaches them
# (MoE: the shared expert, and each routed expert, see splitfuse/quant/model.py).
OTHER_ARCHS = ["opt", "phi", "falcon", "gemma2", "qwen2_moe"]


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_other_architectures_quantized_at_load_match_their_dequantized_weights(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch, intermediate_size=128)
    pipe = assert_matches_dequantized_reference(path, "int8", prompts=make_prompts()[:4])
    weights = pipe.engine.model.weights
    assert any(isinstance(w, QuantizedWeight) for w in weights.values())
    if arch == "qwen2_moe":
        assert isinstance(weights["layers.0.experts.gate_up"], ExpertWeights)
        assert isinstance(weights["layers.0.shared.down.weight"], QuantizedWeight)


def test_cuda_backend_under_the_interpreter_serves_a_quantized_model(tiny_model_dir):
    assert_matches_dequantized_reference(tiny_model_dir("llama"), "int4", backend="cuda", prompts=[[5, 9, 14, 3]])


# ---- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nf4", "int3"])
def test_unsupported_quantization_is_a_clear_error(value):
    with pytest.raises(pydantic.ValidationError, match=rf"quantization={value!r} is not supported; expected one of "
                                                       r"\['int8', 'int4', 'fp8'\] or None"):
        EngineConfig(quantization=value)


def test_quantization_from_the_command_line(tiny_model_dir, capsys):
    assert main(["generate", tiny_model_dir("llama"), "Hello", "--backend", "cpu", "--max-new-tokens", "3",
                 "--temperature", "0", "--ignore-eos", "--quantization", "int4"]) == 0
    assert "3 tokens, finish_reason=length" in capsys.readouterr().err
    assert main(["generate", tiny_model_dir("llama"), "Hello", "--quantization", "nf4"]) == 1
    assert "--quantization 'nf4' is not supported" in capsys.readouterr().err


# ---- fp8 on the cuda backend: _scaled_mm where the GPU multiplies float8 ------------------------------
def _fp8_weight(N: int, K: int, dtype=torch.bfloat16, per_row: bool = True) -> QuantizedWeight:
    """An "fp8" weight as checkpoints give it: float8_e4m3fn data, float32 scales per row (or per block)."""
    w = _weight(N, K) * K ** -0.5
    scales = w.abs().amax(dim=1, keepdim=True) / 448 if per_row else torch.full((N, K // 16), 1e-3)
    group = K if per_row else 16
    data = (w / scales.repeat_interleave(group, dim=1)).to(torch.float8_e4m3fn)
    return QuantizedWeight("fp8", data, scales, None, group, (N, K), dtype)


@pytest.mark.parametrize("weight,capability,expected", [
    pytest.param(_fp8_weight(32, 64), (9, 0), True, id="hopper"),
    pytest.param(_fp8_weight(32, 64), (8, 9), True, id="ada"),
    pytest.param(_fp8_weight(32, 64), (8, 6), False, id="ampere-dequantizes"),
    pytest.param(_fp8_weight(32, 64), None, False, id="not-a-cuda-gpu"),
    pytest.param(_fp8_weight(32, 64, per_row=False), (9, 0), False, id="block-scales-dequantize"),
    pytest.param(_fp8_weight(32, 40), (9, 0), False, id="K-not-a-multiple-of-16"),
    pytest.param(_fp8_weight(32, 64, dtype=torch.float32), (9, 0), False, id="float32-model"),
    pytest.param(quantize(_weight(32, 64), "int8"), (9, 0), False, id="int8-is-not-fp8"),
])
def test_fp8_runs_scaled_mm_only_where_the_gpu_multiplies_float8(weight, capability, expected):
    assert fp8_linear.use_scaled_mm(weight, capability) is expected


def test_cuda_backend_prepares_fp8_for_scaled_mm_by_compute_capability(monkeypatch):
    backend = create_backend("cuda")  # the Triton interpreter on the cpu: no capability of its own
    weight = _fp8_weight(32, 64)
    assert backend.prepare_linear_weight(weight) is weight  # dequantized by Backend.linear
    monkeypatch.setattr(backend, "compute_capability", lambda: (9, 0))
    prepared = backend.prepare_linear_weight(weight)
    assert prepared.layout == fp8_linear.LAYOUT
    # _scaled_mm also runs on the cpu. Activations are rounded to float8 per token: up to 2**-4
    # relative each (uniform), so an output of scale ~1 (weights scaled by K^-0.5) moves by about
    # 2**-4 / sqrt(3) = 0.036 (one sigma); 0.15 is four sigma, far below the outputs themselves
    gen = torch.Generator().manual_seed(5)
    x, bias = torch.randn(3, 64, generator=gen).bfloat16(), torch.randn(32, generator=gen).bfloat16()
    expected = x.float() @ (weight.data.float() * weight.scales).T + bias.float()
    got = backend.linear(x, prepared, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 32)
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=0.15)
    assert (got.float() - expected).abs().mean() < 0.05


# ---- the conformance kit checks the quantized formats a backend claims ---------------------------------
CLAIMING_BACKENDS = '''
import torch

from splitfuse.backends.base import Backend
from splitfuse.plugins import hookimpl
from splitfuse.quant import QuantizedWeight

SPLITFUSE_API_VERSION = 2


class Int8Only(Backend):
    """Claims int8 and runs it right; would fail int4, which it does not claim."""
    name, dtypes, quantized_formats = "int8only", (torch.float32,), ("int8",)

    def linear(self, x, weight, bias=None):
        if isinstance(weight, QuantizedWeight) and weight.format == "int4":
            raise NotImplementedError("int4")
        return super().linear(x, weight, bias)


@hookimpl
def splitfuse_register_backends(registry):
    registry.add(Int8Only)
'''


@pytest.fixture(scope="module")
def claiming_site(tmp_path_factory):
    from test_backend_contract import install_plugin_module

    return install_plugin_module(tmp_path_factory.mktemp("claims"), "splitfuse_claims", "splitfuse_claims",
                                 CLAIMING_BACKENDS)


def test_conformance_checks_only_the_quantized_formats_a_backend_claims(claiming_site, tmp_path):
    from test_backend_contract import assert_conformance_passed, run_conformance

    result = run_conformance("int8only", claiming_site, tmp_path, "-k", "quantized or prepare_linear", "-vv")
    assert_conformance_passed(result)
    assert "int8-9x41x33" in result.stdout and "int4-" not in result.stdout


class ZerolessInt4(Backend):
    """Claims int4 but drops the zero points."""
    name, dtypes, quantized_formats = "zeroless", (torch.float32,), ("int4",)

    def linear(self, x, weight, bias=None):
        if isinstance(weight, QuantizedWeight):
            weight = dataclasses.replace(weight, zeros=torch.zeros_like(weight.zeros))
        return super().linear(x, weight, bias)


def test_conformance_fails_a_wrong_claimed_format():
    from splitfuse.testing.conformance.test_backend_ops import test_quantized_linear

    with pytest.raises(AssertionError, match=r"linear \(int4 weight\)"):
        test_quantized_linear(ZerolessInt4(), torch.float32, "int4", 9, 96, 48, False)
