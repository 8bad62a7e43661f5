"""Fused rotary + KV-cache write (and the plain KV write) against torch_ops.rotary / write_kv."""

from __future__ import annotations

import pytest
import torch

from splitfuse.backends import torch_ops
from splitfuse.backends.triton.rotary_kv import rotary_and_cache, write_kv

# bf16: the kernel rounds every product and sum where torch does, so on the GPU it matches to the
# bit but for fma contraction; the Triton interpreter truncates float32 -> bf16 where torch rounds
# to nearest, so up to 2 bf16 ulps (2**-7 relative each) on values of magnitude up to ~4.
BF16 = dict(rtol=2 ** -6, atol=2 ** -5)
# fp32: the same float32 operations as the reference; the GPU may fuse a product and a sum into one
# fma (1 ulp), the interpreter is exact.
FP32 = dict(rtol=1e-6, atol=1e-6)


def make_inputs(T, H, Hkv, D, rotary_dim, block_size, dtype, device, seed=0, max_pos=64):
    """q/k/v as strided views of one fused qkv projection (as the models produce them), positions,
    a cos/sin cache, a NaN-poisoned cache and shuffled slots in non-adjacent blocks."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen).to(device, dtype)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    cos_sin = torch_ops.build_cos_sin_cache(inv_freq, max_pos, dtype=dtype).to(device)
    positions = torch.randint(0, max_pos, (T,), generator=gen).to(device)
    num_blocks = T // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T].to(device)
    cache = torch.full((2, num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype, device=device)
    return q, k, v, positions, cos_sin, cache, slots


def reference(q, k, v, positions, cos_sin, cache, slots, rotary_dim, interleaved):
    q_ref, k_ref = torch_ops.rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
    cache_ref = cache.clone()
    torch_ops.write_kv(cache_ref, k_ref, v, slots)
    return q_ref, k_ref, cache_ref


def assert_cache_close(got, ref, tol):
    written = ~ref.isnan()
    assert torch.equal(got.isnan(), ref.isnan()), "the kernel wrote a slot it should not have (or missed one)"
    torch.testing.assert_close(got[written].float(), ref[written].float(), **tol)


CASES = {
    # T, H, Hkv, D, rotary_dim, interleaved, block_size
    "mha-d8-block1": (5, 2, 2, 8, 8, False, 1),
    "gqa-d12-block4": (9, 6, 2, 12, 12, False, 4),
    "gqa-d24-partial-block16": (7, 4, 1, 24, 12, False, 16),
    "interleaved-d12-block4": (6, 4, 2, 12, 12, True, 4),
    "interleaved-partial-d24": (5, 3, 3, 24, 8, True, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rotary_and_cache_fp32(device, case):
    T, H, Hkv, D, R, interleaved, bs = CASES[case]
    q, k, v, pos, cos_sin, cache, slots = make_inputs(T, H, Hkv, D, R, bs, torch.float32, device)
    q_ref, k_ref, cache_ref = reference(q, k, v, pos, cos_sin, cache, slots, R, interleaved)
    q_rot, k_rot = rotary_and_cache(q, k, v, pos, cos_sin, cache, slots, R, interleaved)
    torch.testing.assert_close(q_rot, q_ref, **FP32)
    torch.testing.assert_close(k_rot, k_ref, **FP32)
    assert_cache_close(cache, cache_ref, FP32)
    # the inputs are untouched (q/k/v are views into the projection output)
    assert torch.equal(q, make_inputs(T, H, Hkv, D, R, bs, torch.float32, device)[0])


@pytest.mark.parametrize("case", ["gqa-d24-partial-block16", "interleaved-d12-block4"])
def test_rotary_and_cache_bf16(device, case):
    T, H, Hkv, D, R, interleaved, bs = CASES[case]
    q, k, v, pos, cos_sin, cache, slots = make_inputs(T, H, Hkv, D, R, bs, torch.bfloat16, device, seed=3)
    q_ref, k_ref, cache_ref = reference(q, k, v, pos, cos_sin, cache, slots, R, interleaved)
    q_rot, k_rot = rotary_and_cache(q, k, v, pos, cos_sin, cache, slots, R, interleaved)
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    torch.testing.assert_close(q_rot.float(), q_ref.float(), **BF16)
    torch.testing.assert_close(k_rot.float(), k_ref.float(), **BF16)
    assert_cache_close(cache, cache_ref, BF16)


def test_rotary_only_and_without_returned_keys(device):
    T, H, Hkv, D, R, interleaved, bs = CASES["gqa-d12-block4"]
    q, k, v, pos, cos_sin, cache, slots = make_inputs(T, H, Hkv, D, R, bs, torch.float32, device)
    q_ref, k_ref, cache_ref = reference(q, k, v, pos, cos_sin, cache, slots, R, interleaved)
    q_rot, k_rot = rotary_and_cache(q, k, None, pos, cos_sin, None, None)  # rotary_dim from cos_sin
    torch.testing.assert_close(q_rot, q_ref, **FP32)
    torch.testing.assert_close(k_rot, k_ref, **FP32)
    q_rot, k_none = rotary_and_cache(q, k, v, pos, cos_sin, cache, slots, return_k=False)
    assert k_none is None
    torch.testing.assert_close(q_rot, q_ref, **FP32)
    assert_cache_close(cache, cache_ref, FP32)


def test_negative_slots_are_skipped(device):
    q, k, v, pos, cos_sin, cache, slots = make_inputs(4, 2, 2, 8, 8, 4, torch.float32, device)
    slots = slots.clone()
    slots[1] = -1  # a padding token
    rotary_and_cache(q, k, v, pos, cos_sin, cache, slots)
    assert (~cache.isnan()).sum() == 3 * 2 * 2 * 8  # three tokens x (k, v) x heads x D


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_write_kv(device, block_size):
    _, k, v, _, _, cache, slots = make_inputs(11, 4, 2, 12, 12, block_size, torch.float32, device, seed=5)
    ref = cache.clone()
    torch_ops.write_kv(ref, k, v, slots)
    write_kv(k, v, cache, slots)
    assert torch.equal(cache.isnan(), ref.isnan())
    assert torch.equal(cache[~ref.isnan()], ref[~ref.isnan()])


def test_rejects_bad_inputs(device):
    q, k, v, pos, cos_sin, cache, slots = make_inputs(4, 4, 2, 8, 8, 4, torch.float32, device)
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary_and_cache(q, k, v, pos, cos_sin, cache, slots, rotary_dim=6)  # cos_sin is 8 wide
    with pytest.raises(ValueError, match="kv_layer"):
        rotary_and_cache(q, k, v, pos, cos_sin, cache[:, :, :, :1], slots)
    with pytest.raises(ValueError, match="positions"):
        rotary_and_cache(q, k, v, pos[:3], cos_sin, cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(k, v, cache, slots.float())


def test_real_shapes_on_gpu(device):
    if device.type != "cuda":
        pytest.skip("real shapes only on a GPU (the interpreter is too slow)")
    for dtype, tol in ((torch.bfloat16, BF16), (torch.float32, dict(rtol=1e-5, atol=1e-5))):
        q, k, v, pos, cos_sin, cache, slots = make_inputs(700, 32, 8, 128, 128, 16, dtype, device, max_pos=4096)
        q_ref, k_ref, cache_ref = reference(q, k, v, pos, cos_sin, cache, slots, 128, False)
        q_rot, k_rot = rotary_and_cache(q, k, v, pos, cos_sin, cache, slots)
        torch.testing.assert_close(q_rot.float(), q_ref.float(), **tol)
        torch.testing.assert_close(k_rot.float(), k_ref.float(), **tol)
        assert_cache_close(cache, cache_ref, tol)
