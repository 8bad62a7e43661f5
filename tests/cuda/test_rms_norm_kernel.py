"""The fused residual + RMSNorm Triton kernel against torch_ops.rms_norm."""

from __future__ import annotations

import pytest
import torch

from kernel_asserts import assert_outputs_close

from splitfuse.backends import torch_ops
from splitfuse.backends.triton.rms_norm import rms_norm

# fp32: same float32 math as the reference; only the order of the sum of squares differs (a tree
# reduction) and, on the GPU, rsqrt is an approximate instruction: a few ulps.
FP32 = dict(rtol=1e-6, atol=1e-6)
# bf16: the kernel rounds exactly where torch rounds (the residual sum, the cast before the weight,
# the product), but a few-ulp difference in rstd can flip a rounding, and the Triton interpreter
# truncates float32 -> bf16 where torch and the GPU round to nearest: up to 2 bf16 ulps (2**-7
# relative each).
BF16 = dict(rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("block_n", [None, 8], ids=["one-tile", "chunked"])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(7, 41), (3, 9), (2, 3, 64), (1, 1)], ids=str)
def test_matches_reference_fp32(device, shape, with_residual, weight_offset, block_n):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device) * 3
    residual = torch.randn(shape, generator=gen).to(device) if with_residual else None
    weight = torch.randn(shape[-1], generator=gen).to(device)
    got = rms_norm(x, weight, 1e-6, residual, weight_offset, block_n=block_n)
    ref = torch_ops.rms_norm(x, weight, 1e-6, residual, weight_offset)
    assert_outputs_close(got, ref, FP32)
    if with_residual:
        assert torch.equal(got[1], ref[1])  # the residual sum is a single fp32 add either way


@pytest.mark.parametrize("weight_offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("block_n", [None, 16], ids=["one-tile", "chunked"])
def test_bf16(device, weight_offset, block_n):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 41, generator=gen).to(device, torch.bfloat16)
    residual = torch.randn(5, 41, generator=gen).to(device, torch.bfloat16)
    weight = torch.randn(41, generator=gen).to(device, torch.bfloat16)
    got = rms_norm(x, weight, 1e-5, residual, weight_offset, block_n=block_n)
    assert_outputs_close(got, torch_ops.rms_norm(x, weight, 1e-5, residual, weight_offset), BF16)


def test_mixed_weight_dtype_promotes_like_torch(device):
    # Llama path: weight * h.to(x.dtype) gives the promoted dtype (fp32 weight, bf16 x -> fp32)
    x = torch.randn(4, 24).to(device, torch.bfloat16)
    weight = torch.randn(24).to(device)
    got = rms_norm(x, weight, 1e-6)
    ref = torch_ops.rms_norm(x, weight, 1e-6)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, **BF16)


def test_strided_rows_and_empty(device):
    base = torch.randn(6, 50).to(device)
    x = base[:, 3:44]  # rows with stride 50: read in place, no copy needed
    weight = torch.randn(41).to(device)
    assert_outputs_close(rms_norm(x, weight, 1e-6), torch_ops.rms_norm(x, weight, 1e-6), FP32)
    empty = torch.empty(0, 41, device=device)
    assert rms_norm(empty, weight, 1e-6).shape == (0, 41)


def test_rejects_bad_inputs(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(9, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=device), 1e-6, torch.randn(3, 9, device=device))
    with pytest.raises(TypeError):
        rms_norm(x.long(), torch.ones(8, device=device), 1e-6)


@pytest.mark.parametrize("hidden", [4096, 5120, 12288])
def test_real_shapes_on_gpu(device, hidden):
    if device.type != "cuda":
        pytest.skip("real shapes only on a GPU (the interpreter is too slow)")
    x = torch.randn(777, hidden, device=device, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    assert_outputs_close(rms_norm(x, w, 1e-5, r), torch_ops.rms_norm(x, w, 1e-5, r), BF16)
    x32, r32, w32 = x.float(), r.float(), w.float()
    assert_outputs_close(rms_norm(x32, w32, 1e-5, r32), torch_ops.rms_norm(x32, w32, 1e-5, r32), dict(rtol=1e-5, atol=1e-5))
