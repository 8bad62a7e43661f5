"""RMSNorm with the residual add fused in (the kernel is norm.py's, without mean subtraction).

Numerics follow torch_ops.rms_norm (HF LlamaRMSNorm / Gemma2RMSNorm): the residual sum is rounded
to the input dtype, the mean of squares and the scaling run in float32, and then
- weight_offset == 0 (Llama): the normalised row is cast to the input dtype first and multiplied by
  the weight (the product rounded to the promoted dtype of weight and input, as torch does);
- weight_offset != 0 (Gemma): h * (offset + weight) in float32, cast once at the end.
The only difference from the reference is the order of the float32 sum of squares (a tree
reduction here; torch sums in its own blocked order): about 1e-7 relative in float32.
"""

from __future__ import annotations

import torch

from splitfuse.backends.triton.norm import check_args, normalize


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    weight_offset: float = 0.0, block_n: int | None = None,
):
    """RMSNorm over the last dim of x [..., N] (of x + residual, returning (normed, x + residual)).

    block_n forces the column tile (a power of two; smaller than N selects the two-pass path)."""
    check_args("rms_norm", x, residual, weight=weight)
    # Llama casts then scales in the promoted dtype; Gemma casts the float32 product to x's dtype
    out_dtype = x.dtype if weight_offset else torch.promote_types(weight.dtype, x.dtype)
    return normalize(x, weight, None, eps, residual, center=False, out_dtype=out_dtype, weight_offset=weight_offset,
                     cast_before_weight=not weight_offset, block_n=block_n)
