"""Gated activations of a fused gate/up projection: x [..., 2I] = [gate | up] -> act(gate) * up.

Numerics follow torch_ops (F.silu / F.gelu then `* up`): the activation is computed in float32
and rounded to the input dtype, then the product is formed in float32 and rounded again, exactly
the two roundings torch performs for fp16/bf16 inputs (in float32 both are no-ops).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitfuse.backends.triton.common import as_rows, check_floating, num_warps, rows_per_program


# activation codes (constexpr), by the names torch_ops uses
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def activate(g, ACT: tl.constexpr):
    """The activation ACT of float32 g (the MoE kernel applies it too)."""
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))  # silu
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))  # exact gelu
    else:
        # tanh gelu; tanh(y) = 1 - 2 / (exp(2y) + 1) saturates cleanly to +-1 in float32
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
    return a


@triton.jit
def _act_and_mul_kernel(
    x_ptr, out_ptr, M, I, stride_x, stride_out,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    base = x_ptr + rows[:, None] * stride_x + cols[None, :]
    gate = tl.load(base, mask=mask, other=0.0)
    up = tl.load(base + I, mask=mask, other=0.0)
    a = activate(gate.to(tl.float32), ACT)
    a = a.to(gate.dtype).to(tl.float32)  # torch rounds the activation to the input dtype
    out = (a * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out, mask=mask)


def _act_and_mul(x: torch.Tensor, activation: str, op: str) -> torch.Tensor:
    check_floating(op, x=x)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"{op}: the last dim of x must hold [gate | up] (even), got shape {tuple(x.shape)}")
    two_i = x.shape[-1]
    I = two_i // 2
    out = torch.empty(*x.shape[:-1], I, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = as_rows(x, two_i)
    M = x2.shape[0]
    out2 = out.view(M, I)
    # on a GPU ~2K-4K elements per program: memory-bound, wide vectorised loads, plenty of programs;
    # in the interpreter few, large programs
    block_i = min(triton.next_power_of_2(I), 4096 if x.device.type == "cpu" else 1024)
    block_m = rows_per_program(M, block_i, x.device, gpu_elements=2048, gpu_max_rows=8)
    grid = (triton.cdiv(M, block_m), triton.cdiv(I, block_i))
    _act_and_mul_kernel[grid](
        x2, out2, M, I, x2.stride(0), out2.stride(0),
        ACT=ACTIVATIONS[activation], BLOCK_M=block_m, BLOCK_I=block_i, num_warps=num_warps(x.device, 4),
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> silu(gate) * up, [..., I]."""
    return _act_and_mul(x, "silu", "silu_and_mul")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> gelu(gate) * up (GeGLU); approximate "none" or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _act_and_mul(x, "gelu" if approximate == "none" else "gelu_tanh", "gelu_and_mul")
