"""Gated activation Triton kernels (SwiGLU, GeGLU) against torch_ops."""

from __future__ import annotations

import pytest
import torch

from splitfuse.backends import torch_ops
from splitfuse.backends.triton.activation import gelu_and_mul, silu_and_mul

# fp32: exp/erf implementations differ from torch's vectorised ones by an ulp or two; the product
# with `up` (|x| up to ~10 here) scales that: a few 1e-6 absolute.
FP32 = dict(rtol=1e-5, atol=1e-5)
# bf16: the kernel rounds the activation and the product as torch does, but an ulp of difference
# in exp/erf can flip a rounding, and the Triton interpreter truncates float32 -> bf16 where torch
# rounds to nearest: up to 2 bf16 ulps.
BF16 = dict(rtol=2 ** -6, atol=2 ** -6)

OPS = {
    "silu": (silu_and_mul, torch_ops.silu_and_mul),
    "gelu": (lambda x: gelu_and_mul(x, "none"), lambda x: torch_ops.gelu_and_mul(x, "none")),
    "gelu-tanh": (lambda x: gelu_and_mul(x, "tanh"), lambda x: torch_ops.gelu_and_mul(x, "tanh")),
}


# exp overflows to inf for the saturating inputs (numpy warns under the interpreter); inf is correct there
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 18), (2, 3, 82), (1, 2), (4, 128)], ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_matches_reference(device, op, shape, dtype):
    kernel, reference = OPS[op]
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
    x.view(-1)[:4] = torch.tensor([-80.0, 80.0, 0.0, -0.5])[: x.numel()].to(dtype)  # saturating tails
    got, ref = kernel(x), reference(x)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), **(FP32 if dtype == torch.float32 else BF16))


def test_strided_input(device):
    base = torch.randn(4, 40).to(device)
    x = base[:, 2:38]  # row stride 40
    torch.testing.assert_close(silu_and_mul(x), torch_ops.silu_and_mul(x), **FP32)


def test_rejects_bad_inputs(device):
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(3, 7, device=device))
    with pytest.raises(ValueError, match="approximate"):
        gelu_and_mul(torch.randn(3, 8, device=device), "fast")
    assert silu_and_mul(torch.randn(0, 8, device=device)).shape == (0, 4)


def test_real_shapes_on_gpu(device):
    if device.type != "cuda":
        pytest.skip("real shapes only on a GPU (the interpreter is too slow)")
    x = torch.randn(768, 2 * 14336, device=device, dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(x).float(), torch_ops.silu_and_mul(x).float(), **BF16)
    torch.testing.assert_close(gelu_and_mul(x, "tanh").float(), torch_ops.gelu_and_mul(x, "tanh").float(), **BF16)
