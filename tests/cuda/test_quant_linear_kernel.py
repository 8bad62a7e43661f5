"""W8A16 / W4A16 dequantize-GEMM Triton kernels against the dequantized float32 reference."""

from __future__ import annotations

import pytest
import torch

from splitfuse.backends.triton.quant_linear import INT4_LAYOUT, INT8_LAYOUT, prepare, quant_linear
from splitfuse.quant import quantize
from splitfuse.quant.weights import quantize_int4

# Outputs have magnitude ~1 (weights scaled by K^-0.5). fp32: the same products summed in another
# order (IEEE dot, not TF32). bf16/fp16: x and the dequantized weight are rounded to the dtype (as
# the reference's dequantize(x.dtype) does) and the output once more; against the float32
# reference that is a few ulps: 2**-8 per rounding in bf16, 2**-11 in fp16.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
             torch.float16: dict(rtol=4e-3, atol=4e-3)}
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in TOLERANCE]

# (format, M, K, N, int4 group): odd K and N (int8), N and K not tile multiples, one decode row,
# several groups per tile and a tile shorter than a group, one group of a whole row (K = 50)
SHAPES = [
    pytest.param("int8", 9, 41, 33, None, id="int8-9x41x33"),
    pytest.param("int8", 1, 64, 17, None, id="int8-1x64x17"),
    pytest.param("int4", 3, 96, 48, 32, id="int4-3x96x48-g32"),
    pytest.param("int4", 1, 256, 40, 128, id="int4-1x256x40-g128"),
    pytest.param("int4", 5, 50, 17, None, id="int4-5x50x17-one-group"),
]


def _quantized(fmt, K, N, group, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(dtype)
    return quantize(w, "int8") if fmt == "int8" else quantize_int4(w, group)


def _reference(x, weight, bias):
    """x @ dequantize().T + bias, all in float32."""
    out = x.float() @ weight.dequantize(torch.float32).T
    return out if bias is None else out + bias.float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fmt,M,K,N,group", SHAPES)
def test_quant_linear_matches_the_dequantized_reference(device, fmt, M, K, N, group, with_bias, dtype):
    weight = _quantized(fmt, K, N, group, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
    prepared = prepare(weight.to(device))
    got = quant_linear(x.to(device), prepared, None if bias is None else bias.to(device))
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.cpu().float(), _reference(x, weight, bias), **TOLERANCE[dtype])


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fmt,split_k", [("int8", 4), ("int4", 2), ("int4", 16)])
def test_split_k_sums_the_same_products(device, fmt, split_k, with_bias):
    """K cut into slices summed separately (how a decode step fills a GPU): 4 slices of an odd K
    (K = 385: the interpreter's 64-pair tiles, the last slice one lone feature), 2 of K = 256, and
    more slices asked for than K has tiles (capped at one tile each, none empty)."""
    K, N = (385, 24) if fmt == "int8" else (256, 24)
    weight = _quantized(fmt, K, N, 32, torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, K, generator=gen).bfloat16()
    bias = torch.randn(N, generator=gen).bfloat16() if with_bias else None
    got = quant_linear(x.to(device), prepare(weight.to(device)), None if bias is None else bias.to(device),
                       split_k=split_k)
    assert got.dtype == torch.bfloat16 and got.shape == (2, N)
    torch.testing.assert_close(got.cpu().float(), _reference(x, weight, bias), **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("fmt,layout", [("int8", INT8_LAYOUT), ("int4", INT4_LAYOUT)])
def test_prepare_repacks_without_changing_the_matrix(fmt, layout):
    weight = _quantized(fmt, 64, 24, 32, torch.bfloat16)
    prepared = prepare(weight)
    assert prepared.layout == layout and prepared.nbytes == weight.nbytes
    assert torch.equal(prepared.dequantize(torch.float32), weight.dequantize(torch.float32))
    assert prepare(prepared) is prepared  # already in the kernel's layout


def test_leading_dimensions_are_kept_and_empty_batches_work(device):
    prepared = prepare(_quantized("int4", 64, 16, 32, torch.float32).to(device))
    x = torch.randn(2, 3, 64)
    got = quant_linear(x.to(device), prepared)
    assert got.shape == (2, 3, 16)
    torch.testing.assert_close(got.cpu(), _reference(x.view(6, 64), prepared, None).view(2, 3, 16), **TOLERANCE[torch.float32])
    assert quant_linear(torch.empty(0, 64, device=device), prepared).shape == (0, 16)


def test_bad_arguments_are_refused_by_name(device):
    weight = _quantized("int8", 32, 16, None, torch.float32).to(device)
    with pytest.raises(ValueError, match="weight layout must be one of"):
        quant_linear(torch.randn(2, 32, device=device), weight)
    prepared = prepare(weight)
    with pytest.raises(ValueError, match="x has 31 input features, the weight expects K=32"):
        quant_linear(torch.randn(2, 31, device=device), prepared)
    with pytest.raises(ValueError, match=r"bias must be \[N=16\]"):
        quant_linear(torch.randn(2, 32, device=device), prepared, torch.zeros(15, device=device))


def test_real_shapes_on_gpu(device):
    if device.type != "cuda":
        pytest.skip("real shapes only on a GPU (the interpreter is too slow)")
    # Llama-3-8B's layer matrices (fused qkv, o, fused gate/up, down): a decode step, a small
    # batch, a prompt chunk
    for N, K in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        for fmt in ("int8", "int4"):
            weight = _quantized(fmt, K, N, 128, torch.bfloat16).to(device)
            prepared = prepare(weight)
            for M in (1, 16, 256):
                x = torch.randn(M, K, device=device).bfloat16()
                expected = x.float() @ weight.dequantize(torch.float32).T
                torch.testing.assert_close(quant_linear(x, prepared).float(), expected,
                                           **TOLERANCE[torch.bfloat16])


def test_fp8_scaled_mm_at_real_shapes_on_gpu(device):
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("float8 matmuls need a GPU of compute capability 8.9 or later")
    from splitfuse.backends import fp8_linear
    from splitfuse.quant import QuantizedWeight

    N, K = 4096, 4096
    w = torch.randn(N, K, device=device) * K ** -0.5
    scales = w.abs().amax(dim=1, keepdim=True) / fp8_linear.FP8_MAX
    weight = QuantizedWeight("fp8", (w / scales).to(torch.float8_e4m3fn), scales, None, K, (N, K), torch.bfloat16)
    assert fp8_linear.use_scaled_mm(weight, torch.cuda.get_device_capability(device))
    x = torch.randn(16, K, device=device).bfloat16()
    expected = x.float() @ (weight.data.float() * scales).T
    got = fp8_linear.scaled_mm_linear(x, fp8_linear.prepare(weight)).float()
    # activations rounded to float8 per token: about 2**-4 / sqrt(3) of outputs ~1 (one sigma)
    assert (got - expected).abs().max() < 0.2 and (got - expected).abs().mean() < 0.05
