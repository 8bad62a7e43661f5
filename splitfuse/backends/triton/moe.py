"""Mixture-of-experts MLP as two grouped GEMMs over (token, expert) pairs sorted by expert.

The pairs of each expert are padded to a multiple of BLOCK_M, so every BLOCK_M-row tile belongs
to one expert and multiplies by that expert's weights only:
  1. gate/up tile GEMM, activation and product fused: h [pairs, I] (rounded to the input dtype,
     as torch rounds the linear output and the activation);
  2. down tile GEMM, scaled by the pair's routing weight in float32, written to the pair's row;
then the top-k rows of each token are summed. The sorting and padding are torch ops with shapes
fixed by the batch size (no host sync), so a decode step can be captured in a CUDA graph.
Numerics follow torch_ops.moe_experts; accumulation is float32 (IEEE, not TF32, for fp32 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitfuse.backends.triton.activation import ACTIVATIONS, activate
from splitfuse.backends.triton.common import num_warps

@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, pairs_ptr, block_expert_ptr, num_pairs, top_k, H, I,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_hm,
    ACT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= 0:  # tiles past the last expert's padding hold no pairs
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        pairs = tl.load(pairs_ptr + rows)
        valid = pairs < num_pairs
        tokens = tl.where(valid, pairs // top_k, 0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < I
        w_base = w_ptr + expert * stride_we
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = ks < H
            a = tl.load(x_ptr + tokens[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            w_off = cols[None, :] * stride_wn + ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]: W^T tile
            w_gate = tl.load(w_base + w_off, mask=w_mask, other=0.0)
            w_up = tl.load(w_base + I * stride_wn + w_off, mask=w_mask, other=0.0)
            if UPCAST:
                a, w_gate, w_up = a.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
            if IEEE:
                acc_gate = tl.dot(a, w_gate, acc_gate, input_precision="ieee")
                acc_up = tl.dot(a, w_up, acc_up, input_precision="ieee")
            else:
                acc_gate = tl.dot(a, w_gate, acc_gate)
                acc_up = tl.dot(a, w_up, acc_up)
        dtype = h_ptr.dtype.element_ty
        # torch: gate/up come out of the linear in the input dtype, the activation is rounded to it,
        # then the product is formed and rounded again
        gate = acc_gate.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        act = activate(gate, ACT).to(dtype).to(tl.float32)
        tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :], (act * up).to(dtype),
                 mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, out_ptr, weights_ptr, pairs_ptr, block_expert_ptr, num_pairs, H, I,
    stride_hm, stride_we, stride_wn, stride_wk, stride_om,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        pairs = tl.load(pairs_ptr + rows)
        valid = pairs < num_pairs
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # over the hidden size
        col_ok = cols < H
        w_base = w_ptr + expert * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = ks < I
            a = tl.load(h_ptr + rows[:, None] * stride_hm + ks[None, :], mask=valid[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        dtype = out_ptr.dtype.element_ty
        weight = tl.load(weights_ptr + tl.where(valid, pairs, 0), mask=valid, other=0.0).to(tl.float32)
        out = acc.to(dtype).to(tl.float32) * weight[:, None]  # torch: expert output (dtype) x weight (fp32)
        tl.store(out_ptr + pairs[:, None] * stride_om + cols[None, :], out.to(dtype),
                 mask=valid[:, None] & col_ok[None, :])


def _sort_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(pairs [num_blocks * block_m] sorted by expert, each expert padded to whole tiles with the
    sentinel num_pairs; block_expert [num_blocks], -1 past the last tile). num_blocks is an upper
    bound fixed by the shape: every non-empty expert adds less than one tile of padding."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    num_blocks = triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)
    pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int64, device=device)
    pairs[(padded_end - padded)[sorted_experts] + rank] = order
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pairs, block_expert


def moe_experts(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, activation: str = "silu",
) -> torch.Tensor:
    """x [T, H], topk_weights/topk_ids [T, k], w_gate_up [E, 2I, H] ([gate | up]), w_down [E, H, I]
    -> [T, H]: each token's experts weighted and summed (see torch_ops.moe_experts)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_experts activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: expected x [T, H] and topk_weights/topk_ids [T, k], got "
                         f"{tuple(x.shape)}, {tuple(topk_weights.shape)}, {tuple(topk_ids.shape)}")
    E, two_i, H = w_gate_up.shape
    I = two_i // 2
    if H != x.shape[1] or two_i % 2 or tuple(w_down.shape) != (E, H, I):
        raise ValueError(f"moe_experts: expected w_gate_up [E, 2I, {x.shape[1]}] and w_down [E, {x.shape[1]}, I], "
                         f"got {tuple(w_gate_up.shape)} and {tuple(w_down.shape)}")
    T, K = topk_ids.shape
    if T == 0:
        return torch.zeros_like(x)
    num_pairs = T * K
    on_cpu = x.device.type == "cpu"  # the Triton interpreter: small tiles are cheapest
    block_m = 16 if on_cpu or num_pairs <= 64 else 64
    block_n = 32 if on_cpu else 64
    block_k = 32 if on_cpu else 64
    pairs, block_expert = _sort_pairs(topk_ids, E, block_m)
    h = torch.empty(pairs.numel(), I, dtype=x.dtype, device=x.device)
    out_pairs = torch.empty(num_pairs, H, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    ieee = x.dtype == torch.float32
    # the interpreter's dot mishandles 16-bit floats: it gets float32 copies (the same products,
    # since bf16/fp16 values are exact in float32; a GPU's tensor cores accumulate in float32 too)
    upcast = on_cpu and not ieee
    warps = num_warps(x.device, 4)
    _gate_up_kernel[(block_expert.numel(), triton.cdiv(I, block_n))](
        x, w_gate_up, h, pairs, block_expert, num_pairs, K, H, I,
        x.stride(0), x.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), h.stride(0),
        ACT=ACTIVATIONS[activation], IEEE=ieee, UPCAST=upcast, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps,
    )
    _down_kernel[(block_expert.numel(), triton.cdiv(H, block_n))](
        h, w_down, out_pairs, weights, pairs, block_expert, num_pairs, H, I,
        h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), out_pairs.stride(0),
        IEEE=ieee, UPCAST=upcast, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return out_pairs.view(T, K, H).sum(dim=1)
