"""LayerNorm with the residual add fused in (the kernel is norm.py's, with mean subtraction and bias).

Numerics follow torch_ops.layer_norm (F.layer_norm after `x + residual`): the residual sum is
rounded to the input dtype, mean and variance (biased, of x - mean: no cancellation) run in
float32, then (x - mean) * rstd * weight + bias in float32, rounded once to the input dtype.
Against torch only the order of the float32 sums differs (tree reductions here), about 1e-7
relative in float32.
"""

from __future__ import annotations

import torch

from splitfuse.backends.triton.norm import check_args, normalize


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None = None, block_n: int | None = None,
):
    """LayerNorm over the last dim of x [..., N] (of x + residual, returning (normed, x + residual)).

    block_n forces the column tile (a power of two; smaller than N selects the chunked path)."""
    check_args("layer_norm", x, residual, weight=weight, bias=bias)
    return normalize(x, weight, bias, eps, residual, center=True, out_dtype=x.dtype, block_n=block_n)
