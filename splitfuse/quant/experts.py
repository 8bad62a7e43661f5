"""Quantized routed experts of a mixture-of-experts layer: one QuantizedWeight per expert, held
where the model keeps its stacked expert tensor, and the expert MLP that runs them.

The backend's `moe_experts` op takes stacked float tensors; quantized experts instead go through
the backend's `linear` one expert at a time (its weight-only kernels where it has them, else
each expert's matrix dequantized before its matmul).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from splitfuse.quant.weights import QuantizedWeight


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """E quantized matrices [N, K] standing for a stacked expert tensor [E, N, K]."""

    experts: tuple[QuantizedWeight, ...]

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, expert: int) -> QuantizedWeight:
        return self.experts[expert]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.experts)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stacked float tensor [E, N, K] these experts stand for."""
        return torch.stack([w.dequantize(dtype) for w in self.experts])

    def map(self, fn: Callable[[QuantizedWeight], QuantizedWeight]) -> "ExpertWeights":
        return ExpertWeights(tuple(fn(w) for w in self.experts))

    def __repr__(self) -> str:
        return f"ExpertWeights({len(self)} x {self.experts[0]!r})"


def quantized_moe_experts(ops, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          gate_up: ExpertWeights, down: ExpertWeights) -> torch.Tensor:
    """What `ops.moe_experts` computes (SiLU-gated experts) with quantized experts: for each expert
    chosen in this batch, its tokens through `ops.linear`; weighed in float32 and added into each
    token's row in expert order, as the stacked op does."""
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():  # sorted: the order the stacked op adds in
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        h = ops.linear(ops.silu_and_mul(ops.linear(x[tokens], gate_up[expert])), down[expert])
        weighed = h.float() * topk_weights[tokens, slots, None].float()
        out.index_add_(0, tokens, weighed.to(x.dtype))
    return out
