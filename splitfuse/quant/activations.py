"""Activation quantization of W8A8 checkpoints, emulated: each linear layer's input is rounded to
float8_e4m3fn and scaled back (quantize-dequantize) before a matmul in the compute dtype.

This is what compressed-tensors itself runs for such a checkpoint when no FP8 kernel is used (the
route transformers takes on a CPU): x_q = float8(clamp(x / s, -448, 448)) * s, in float32, with
s = max|x| / 448 over each token's features ("token", dynamic), over each group of `group_size`
features of a token ("group", dynamic), or the checkpoint's `input_scale` ("tensor", static).
An FP8 GEMM with float32 accumulation computes the same products, so outputs differ from one only
in summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
STRATEGIES = ("token", "group", "tensor")


@dataclass(frozen=True)
class InputQuantizer:
    """FP8 quantize-dequantize of a linear layer's input: per token or token group (dynamic) or per
    tensor (static)."""

    strategy: str  # "token" | "group": scale from the max |x| of a token (group); "tensor": `scale`
    scale: float | None = None  # the static per-tensor scale; None when dynamic
    group_size: int | None = None  # "group": input features sharing one scale

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"input quantization strategy {self.strategy!r}: expected one of {list(STRATEGIES)}")
        if (self.scale is None) != (self.strategy != "tensor"):
            raise ValueError(f"input quantization strategy {self.strategy!r} takes "
                             f"{'a static' if self.strategy == 'tensor' else 'no'} scale; got {self.scale!r}")
        if (self.group_size is None) != (self.strategy != "group"):
            raise ValueError(f"input quantization strategy {self.strategy!r}: group_size={self.group_size!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] as the FP8 GEMM sees it, in x's dtype."""
        xf = x.float()
        if self.strategy == "group":
            xf = xf.unflatten(-1, (-1, self.group_size))
        if self.strategy == "tensor":
            scale = torch.tensor(self.scale, dtype=torch.float32, device=x.device)
        else:
            scale = xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX
            scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)  # as compressed-tensors
        q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return (q.float() * scale).flatten(-2 if self.strategy == "group" else -1).to(x.dtype)
