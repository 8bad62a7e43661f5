"""The fused residual + LayerNorm Triton kernel against torch_ops.layer_norm."""

from __future__ import annotations

import pytest
import torch

from kernel_asserts import assert_outputs_close

from splitfuse.backends import torch_ops
from splitfuse.backends.triton.layer_norm import layer_norm

# fp32: the same float32 math as torch; only the order of the two row sums differs (tree
# reductions): a few ulps of the normalised value, times |weight| up to ~3 here.
FP32 = dict(rtol=1e-5, atol=1e-5)
# bf16: one rounding of the float32 result, as torch; a few-ulp difference before it can flip that
# rounding, and the interpreter truncates float32 -> bf16 where torch rounds to nearest: 2 ulps.
BF16 = dict(rtol=2 ** -6, atol=2 ** -6)


def _inputs(shape, device, dtype=torch.float32, seed=0, with_residual=True, affine=(True, True)):
    gen = torch.Generator().manual_seed(seed)
    # an offset mean, so a kernel that skipped centring (or got it from a cancelling E[x^2] - mean^2) fails
    x = (torch.randn(shape, generator=gen) * 3 + 5).to(device, dtype)
    residual = torch.randn(shape, generator=gen).to(device, dtype) if with_residual else None
    weight = torch.randn(shape[-1], generator=gen).to(device, dtype) if affine[0] else None
    bias = torch.randn(shape[-1], generator=gen).to(device, dtype) if affine[1] else None
    return x, weight, bias, residual


@pytest.mark.parametrize("block_n", [None, 8], ids=["one-tile", "chunked"])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)], ids=["w+b", "w", "none"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(7, 41), (3, 9), (2, 3, 64), (1, 1), (5, 341)], ids=str)
def test_matches_reference_fp32(device, shape, with_residual, affine, block_n):
    x, weight, bias, residual = _inputs(shape, device, with_residual=with_residual, affine=affine)
    got = layer_norm(x, weight, bias, 1e-5, residual, block_n=block_n)
    ref = torch_ops.layer_norm(x, weight, bias, 1e-5, residual)
    assert_outputs_close(got, ref, FP32)
    if with_residual:
        assert torch.equal(got[1], ref[1])  # the residual sum is a single fp32 add either way


@pytest.mark.parametrize("block_n", [None, 16], ids=["one-tile", "chunked"])
def test_bf16(device, block_n):
    x, weight, bias, residual = _inputs((5, 41), device, torch.bfloat16, seed=1)
    normed, total = layer_norm(x, weight, bias, 1e-5, residual, block_n=block_n)
    ref_normed, ref_total = torch_ops.layer_norm(x, weight, bias, 1e-5, residual)
    # the interpreter may truncate the sum where torch rounds it (1 ulp of values up to ~15), and
    # LayerNorm divides by the row's spread (~3) and multiplies by |weight|: compare the normalisation
    # of the kernel's own sum, and the sum itself to within an ulp
    assert_outputs_close(total, ref_total, BF16)
    assert_outputs_close(normed, torch_ops.layer_norm(total, weight, bias, 1e-5), BF16)
    assert_outputs_close(layer_norm(x, weight, bias, 1e-5, block_n=block_n), torch_ops.layer_norm(x, weight, bias, 1e-5), BF16)
    if device.type == "cuda":  # round to nearest everywhere: the same sum and the same output
        assert torch.equal(total, ref_total)
        assert_outputs_close(normed, ref_normed, BF16)


def test_strided_rows_and_empty(device):
    base = torch.randn(6, 50).to(device)
    x = base[:, 3:44]  # rows with stride 50: read in place
    weight, bias = torch.randn(41).to(device), torch.randn(41).to(device)
    assert_outputs_close(layer_norm(x, weight, bias, 1e-5), torch_ops.layer_norm(x, weight, bias, 1e-5), FP32)
    # per-head norms (Phi's qk LayerNorm) see q as a [T, H, D] slice of the fused qkv output
    qkv = torch.randn(5, 3 * 4 * 16).to(device)
    q = qkv[:, : 4 * 16].view(5, 4, 16)
    w16, b16 = torch.randn(16).to(device), torch.randn(16).to(device)
    assert_outputs_close(layer_norm(q, w16, b16, 1e-5), torch_ops.layer_norm(q, w16, b16, 1e-5), FP32)
    empty = torch.empty(0, 41, device=device)
    assert layer_norm(empty, weight, bias, 1e-5).shape == (0, 41)


def test_rejects_bad_inputs(device):
    x = torch.randn(3, 8, device=device)
    ones = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="weight shape"):
        layer_norm(x, torch.ones(9, device=device), ones, 1e-5)
    with pytest.raises(ValueError, match="bias shape"):
        layer_norm(x, ones, torch.ones(7, device=device), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        layer_norm(x, ones, ones, 1e-5, torch.randn(3, 9, device=device))
    with pytest.raises(TypeError):
        layer_norm(x.long(), ones, ones, 1e-5)


@pytest.mark.parametrize("hidden", [2560, 4544, 8192, 12288])
def test_real_shapes_on_gpu(device, hidden):
    if device.type != "cuda":
        pytest.skip("real shapes only on a GPU (the interpreter is too slow)")
    x = torch.randn(777, hidden, device=device, dtype=torch.bfloat16) + 2
    r = torch.randn_like(x)
    w = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    b = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    assert_outputs_close(layer_norm(x, w, b, 1e-5, r), torch_ops.layer_norm(x, w, b, 1e-5, r), BF16)
    x32, r32, w32, b32 = x.float(), r.float(), w.float(), b.float()
    assert_outputs_close(layer_norm(x32, w32, b32, 1e-5, r32), torch_ops.layer_norm(x32, w32, b32, 1e-5, r32), FP32)
