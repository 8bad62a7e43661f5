"""Rotary embedding fused with the paged KV-cache write, and a plain KV-cache write.

`rotary_and_cache` rotates q [T, H, D] and k [T, Hkv, D] at `positions` and stores the rotated k
and v into one layer's cache [2, num_blocks, block_size, Hkv, D] at `slot_mapping` (slot =
block * block_size + offset) in one launch, so the rotated keys are never read back from memory.

Numerics follow torch_ops.rotary (HF apply_rotary_pos_emb): cos/sin are rounded to the activation
dtype, and each product and sum of `x1*cos - x2*sin`, `x2*cos + x1*sin` is rounded to that dtype
as torch rounds it. In float32 that is the reference computation itself; the GPU compiler may still
contract a product and the following sum into one fma (1 ulp).
Slots < 0 are skipped (padding tokens of a captured batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitfuse.backends.triton.common import (
    check_device, check_floating, check_index, check_same_shape, num_warps, unit_last,
)


@triton.jit
def _rotate_pair(x1, x2, cos, sin, dtype: tl.constexpr):
    """(x1*cos - x2*sin, x2*cos + x1*sin) with torch's per-op rounding to `dtype`."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    a = (x1 * cos).to(dtype).to(tl.float32)
    b = (x2 * sin).to(dtype).to(tl.float32)
    c = (x2 * cos).to(dtype).to(tl.float32)
    d = (x1 * sin).to(dtype).to(tl.float32)
    return (a - b).to(dtype), (c + d).to(dtype)


@triton.jit
def _rotary_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, q_out_ptr, k_out_ptr, cache_ptr, slot_ptr,
    H, HKV, D, HALF, KV_BLOCK,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_ckv, stride_cblk, stride_coff, stride_ch,
    INTERLEAVED: tl.constexpr, HAS_PASS: tl.constexpr, WRITE_KV: tl.constexpr, STORE_K: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1).to(tl.int64) * BLOCK_H
    heads = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < HALF
    if INTERLEAVED:
        i1 = 2 * r  # GPT-J pairs (x[2i], x[2i+1])
        i2 = 2 * r + 1
    else:
        i1 = r  # neox halves (x[i], x[i + rotary_dim/2])
        i2 = r + HALF
    dtype = q_out_ptr.dtype.element_ty

    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + r, mask=r_mask, other=0.0)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + r, mask=r_mask, other=0.0)
    # HF casts cos/sin to the activation dtype before rotating
    cos = cos.to(dtype).to(tl.float32)[None, :]
    sin = sin.to(dtype).to(tl.float32)[None, :]
    # pass-through features (partial rotary): columns [2 * HALF, D)
    p = tl.arange(0, BLOCK_D)
    p_mask = (p >= 2 * HALF) & (p < D)

    # ---- queries ----
    hq_mask = heads < H
    m = hq_mask[:, None] & r_mask[None, :]
    q_row = q_ptr + t * stride_qt + heads[:, None] * stride_qh
    qo_row = q_out_ptr + t * stride_qot + heads[:, None] * stride_qoh
    x1 = tl.load(q_row + i1[None, :], mask=m, other=0.0)
    x2 = tl.load(q_row + i2[None, :], mask=m, other=0.0)
    o1, o2 = _rotate_pair(x1, x2, cos, sin, dtype)
    tl.store(qo_row + i1[None, :], o1, mask=m)
    tl.store(qo_row + i2[None, :], o2, mask=m)
    if HAS_PASS:
        mp = hq_mask[:, None] & p_mask[None, :]
        tl.store(qo_row + p[None, :], tl.load(q_row + p[None, :], mask=mp, other=0.0).to(dtype), mask=mp)

    # ---- keys (and values): only head blocks that overlap [0, HKV) ----
    # (names differ from the query part's: a runtime `if` must not change a variable's type)
    if h0 < HKV:
        kdtype = k_out_ptr.dtype.element_ty
        hk_mask = heads < HKV
        km = hk_mask[:, None] & r_mask[None, :]
        kmp = hk_mask[:, None] & p_mask[None, :]
        k_row = k_ptr + t * stride_kt + heads[:, None] * stride_kh
        k1 = tl.load(k_row + i1[None, :], mask=km, other=0.0)
        k2 = tl.load(k_row + i2[None, :], mask=km, other=0.0)
        ko1, ko2 = _rotate_pair(k1, k2, cos, sin, kdtype)
        if HAS_PASS:
            kp = tl.load(k_row + p[None, :], mask=kmp, other=0.0).to(kdtype)
        if STORE_K:
            ko_row = k_out_ptr + t * stride_kot + heads[:, None] * stride_koh
            tl.store(ko_row + i1[None, :], ko1, mask=km)
            tl.store(ko_row + i2[None, :], ko2, mask=km)
            if HAS_PASS:
                tl.store(ko_row + p[None, :], kp, mask=kmp)
        if WRITE_KV:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            valid = slot >= 0
            c_row = (cache_ptr + (slot // KV_BLOCK) * stride_cblk + (slot % KV_BLOCK) * stride_coff
                     + heads[:, None] * stride_ch)
            cdtype = cache_ptr.dtype.element_ty
            tl.store(c_row + i1[None, :], ko1.to(cdtype), mask=km & valid)
            tl.store(c_row + i2[None, :], ko2.to(cdtype), mask=km & valid)
            if HAS_PASS:
                tl.store(c_row + p[None, :], kp.to(cdtype), mask=kmp & valid)
            d = tl.arange(0, BLOCK_D)
            mv = hk_mask[:, None] & (d < D)[None, :] & valid
            v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=mv, other=0.0)
            tl.store(c_row + stride_ckv + d[None, :], v.to(cdtype), mask=mv)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, HKV, D, KV_BLOCK,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ckv, stride_cblk, stride_coff, stride_ch,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    m = (heads < HKV)[:, None] & (d < D)[None, :] & (slot >= 0)
    c_row = cache_ptr + (slot // KV_BLOCK) * stride_cblk + (slot % KV_BLOCK) * stride_coff + heads[:, None] * stride_ch
    cdtype = cache_ptr.dtype.element_ty
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + d[None, :], mask=m, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=m, other=0.0)
    tl.store(c_row + d[None, :], k.to(cdtype), mask=m)
    tl.store(c_row + stride_ckv + d[None, :], v.to(cdtype), mask=m)


# ---- host side ----------------------------------------------------------------------------------
def _check_tokens(op: str, name: str, t: torch.Tensor, num_tokens: int, head_dim: int, device) -> None:
    if t.dim() != 3 or t.shape[0] != num_tokens or t.shape[2] != head_dim:
        raise ValueError(f"{op}: {name} must be [T={num_tokens}, heads, D={head_dim}], got {tuple(t.shape)}")
    check_floating(op, **{name: t})
    check_device(op, device, **{name: t})


def _check_cache(op: str, kv_layer: torch.Tensor, slot_mapping: torch.Tensor, num_tokens: int, num_kv_heads: int,
                 head_dim: int, device) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2 or tuple(kv_layer.shape[3:]) != (num_kv_heads, head_dim):
        raise ValueError(f"{op}: kv_layer must be [2, num_blocks, block_size, {num_kv_heads}, {head_dim}], "
                         f"got {tuple(kv_layer.shape)}")
    if kv_layer.stride(-1) != 1:
        raise ValueError(f"{op}: kv_layer must have unit stride in its last dim")
    check_floating(op, kv_layer=kv_layer)
    check_index(op, "slot_mapping", slot_mapping, num_tokens)
    check_device(op, device, kv_layer=kv_layer, slot_mapping=slot_mapping)


def _head_block(heads: int, block_d: int, device: torch.device) -> int:
    if device.type == "cpu":  # the Triton interpreter: all heads of a token in one program
        return triton.next_power_of_2(heads)
    # about 2K elements per tile keeps registers low while loads stay wide
    return max(1, min(triton.next_power_of_2(heads), 2048 // block_d))


def rotary_and_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, positions: torch.Tensor, cos_sin: torch.Tensor,
    kv_layer: torch.Tensor | None, slot_mapping: torch.Tensor | None, rotary_dim: int | None = None,
    interleaved: bool = False, return_k: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q [T, H, D] and k [T, Hkv, D] at positions [T]; when kv_layer is given, also store the
    rotated k and v [T, Hkv, D] into it at slot_mapping [T]. Returns (q_rot, k_rot), new tensors;
    k_rot is None when return_k is False (attention reads keys from the cache only).

    cos_sin [max_positions, rotary_dim] = cat(cos, sin) (torch_ops.build_cos_sin_cache); features
    of q/k past rotary_dim pass through unchanged. interleaved selects GPT-J pairs.
    """
    op = "rotary_and_cache"
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [T, H, D], got {tuple(q.shape)}")
    T, H, D = q.shape
    device = q.device
    _check_tokens(op, "q", q, T, D, device)
    _check_tokens(op, "k", k, T, D, device)
    Hkv = k.shape[1]
    if Hkv > H:
        raise ValueError(f"{op}: k has more heads ({Hkv}) than q ({H})")
    rotary_dim = rotary_dim or cos_sin.shape[-1]
    if cos_sin.dim() != 2 or cos_sin.shape[-1] != rotary_dim or rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"{op}: cos_sin must be [max_positions, rotary_dim] with an even rotary_dim <= D={D}; "
                         f"got {tuple(cos_sin.shape)} and rotary_dim={rotary_dim}")
    check_index(op, "positions", positions, T)
    check_device(op, device, positions=positions, cos_sin=cos_sin)
    write = kv_layer is not None
    if write:
        if v is None or slot_mapping is None:
            raise ValueError(f"{op}: writing the KV cache needs v and slot_mapping")
        _check_tokens(op, "v", v, T, D, device)
        check_same_shape(op, "v", v, "k", k)
        _check_cache(op, kv_layer, slot_mapping, T, Hkv, D, device)
    store_k = return_k or not write
    q_out = torch.empty(T, H, D, dtype=q.dtype, device=device)
    k_out = torch.empty(T, Hkv, D, dtype=k.dtype, device=device) if store_k else None
    if T == 0:
        return q_out, k_out
    q, k = unit_last(q), unit_last(k)
    cos_sin = unit_last(cos_sin)
    if write:
        v = unit_last(v)
    else:
        v, kv_layer, slot_mapping = k, q_out, positions  # unused placeholders (WRITE_KV is off)
    kv_block = kv_layer.shape[2] if write else 1
    cs = kv_layer.stride() if write else (0, 0, 0, 0, 0)
    ko = k_out if store_k else q_out  # placeholder when not stored
    block_d = triton.next_power_of_2(D)
    block_h = _head_block(H, block_d, device)
    grid = (T, triton.cdiv(H, block_h))
    _rotary_kv_kernel[grid](
        q, k, v, positions, cos_sin, q_out, ko, kv_layer, slot_mapping,
        H, Hkv, D, rotary_dim // 2, kv_block,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        q_out.stride(0), q_out.stride(1), ko.stride(0), ko.stride(1),
        cs[0], cs[1], cs[2], cs[3],
        INTERLEAVED=bool(interleaved), HAS_PASS=rotary_dim < D, WRITE_KV=write, STORE_K=store_k,
        BLOCK_H=block_h, BLOCK_R=triton.next_power_of_2(max(rotary_dim // 2, 1)), BLOCK_D=block_d,
        num_warps=num_warps(device, 4),
    )
    return q_out, k_out


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hkv, D] into kv_layer [2, num_blocks, block_size, Hkv, D] at slot_mapping [T]."""
    op = "write_kv"
    if k.dim() != 3:
        raise ValueError(f"{op}: k must be [T, Hkv, D], got {tuple(k.shape)}")
    T, Hkv, D = k.shape
    _check_tokens(op, "k", k, T, D, k.device)
    _check_tokens(op, "v", v, T, D, k.device)
    check_same_shape(op, "v", v, "k", k)
    _check_cache(op, kv_layer, slot_mapping, T, Hkv, D, k.device)
    if T == 0:
        return
    k, v = unit_last(k), unit_last(v)
    block_d = triton.next_power_of_2(D)
    block_h = _head_block(Hkv, block_d, k.device)
    cs = kv_layer.stride()
    _write_kv_kernel[(T, triton.cdiv(Hkv, block_h))](
        k, v, kv_layer, slot_mapping, Hkv, D, kv_layer.shape[2],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cs[0], cs[1], cs[2], cs[3],
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps(k.device, 4),
    )
