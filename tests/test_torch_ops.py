"""The plain-torch reference ops against dense references and Hugging Face transformers."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from splitfuse.backends import torch_ops

from splitfuse.testing.ragged import filled_cache, ragged_step  # noqa: E402


# ---- helpers ------------------------------------------------------------------------------------
def make_batch(specs, block_size, num_kv_heads, head_dim, dtype=torch.float32, seed=0):
    """A ragged batch over a paged cache with shuffled blocks and NaN in unwritten slots.

    specs: (context_len, new_tokens) per sequence, context_len counting the new tokens.
    Returns (meta, kv_layer, keys, values): keys/values hold each sequence's full dense K/V.
    """
    step = ragged_step(specs, block_size, seed)
    kv_layer, keys, values = filled_cache(step, num_kv_heads, head_dim, dtype, seed)
    return step.meta, kv_layer, keys, values


def dense_attention(q, keys, values, specs, scale, window=None, softcap=None):
    """Per-sequence masked softmax attention in float64 on contiguous K/V: the ground truth."""
    H = q.shape[1]
    out, t = [], 0
    for (ctx, new), k, v in zip(specs, keys, values):
        G = H // k.shape[1]
        k = k.double().repeat_interleave(G, dim=1)  # [ctx, H, D]: query head h reads kv head h // G
        v = v.double().repeat_interleave(G, dim=1)
        s = torch.einsum("qhd,jhd->hqj", q[t : t + new].double(), k) * scale  # [H, new, ctx]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        p = torch.arange(ctx - new, ctx)[:, None]  # query positions
        j = torch.arange(ctx)[None, :]  # key positions
        hidden = j > p if window is None else (j > p) | (p - j >= window)
        s = s.masked_fill(hidden, float("-inf"))
        out.append(torch.einsum("hqj,jhd->qhd", torch.softmax(s, dim=-1), v))
        t += new
    return torch.cat(out)


# prior context and new tokens mixed: decodes, a first prompt chunk, later chunks, a 1-token prompt
MIXED = [(1, 1), (9, 1), (17, 17), (40, 7), (33, 1), (5, 5), (70, 1), (64, 20), (2, 1)]


# ---- write_kv -----------------------------------------------------------------------------------
def test_write_kv_places_each_token_at_its_slot_and_casts():
    kv = torch.zeros(2, 3, 4, 2, 8, dtype=torch.bfloat16)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([9, 0, 3, 4, 11])
    torch_ops.write_kv(kv, k, v, slots)
    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, 4)
        assert torch.equal(kv[0, block, offset], k[i].bfloat16())
        assert torch.equal(kv[1, block, offset], v[i].bfloat16())
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[slots] = False
    assert not kv.view(2, 12, 2, 8)[:, untouched].any()  # nothing else written


# ---- paged_attention ----------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("H,Hkv,D", [(4, 2, 8), (4, 4, 12), (6, 1, 8)])
def test_paged_attention_matches_dense_fp32(block_size, H, Hkv, D):
    meta, kv, keys, values = make_batch(MIXED, block_size, Hkv, D)
    q = torch.randn(meta.num_tokens, H, D)
    out = torch_ops.paged_attention(q, kv, meta, D**-0.5)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dense_attention(q, keys, values, MIXED, D**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_decodes_first_then_chunks(block_size, window):
    """The engine's SplitFuse layout: a run of decodes, then prompt chunks (a later chunk of a
    prompt, a first chunk, a whole prompt). The decodes' queries and outputs are slices then."""
    specs = [(9, 1), (30, 1), (2, 1), (1, 1), (40, 8), (17, 17), (23, 6)]
    meta, kv, keys, values = make_batch(specs, block_size, 2, 8, seed=8)
    q = torch.randn(meta.num_tokens, 4, 8)
    out = torch_ops.paged_attention(q, kv, meta, 0.3, sliding_window=window)
    (plan,) = [v for v in meta.step_cache.values() if isinstance(v, torch_ops._StepPlan)]
    assert [g.first for g in plan.decodes] == [0]
    ref = dense_attention(q, keys, values, specs, 0.3, window=window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,softcap", [(1, None), (5, None), (16, None), (None, 2.0), (6, 5.0)])
def test_paged_attention_sliding_window_and_softcap(window, softcap):
    meta, kv, keys, values = make_batch(MIXED, 4, 2, 8, seed=1)
    q = torch.randn(meta.num_tokens, 4, 8) * 3  # large logits so the softcap bites
    out = torch_ops.paged_attention(q, kv, meta, 0.3, sliding_window=window, logit_softcap=softcap)
    ref = dense_attention(q, keys, values, MIXED, 0.3, window=window, softcap=softcap)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_alternating_windows_on_one_meta():
    """Gemma2 alternates windowed and global layers over the same step metadata."""
    meta, kv, keys, values = make_batch(MIXED, 4, 2, 8, seed=2)
    q = torch.randn(meta.num_tokens, 4, 8)
    for window in (None, 4, None, 4):
        out = torch_ops.paged_attention(q, kv, meta, 0.35, sliding_window=window)
        ref = dense_attention(q, keys, values, MIXED, 0.35, window=window)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_decode_only_batch():
    specs = [(1 + 13 * i % 50, 1) for i in range(40)]
    meta, kv, keys, values = make_batch(specs, 16, 2, 8, seed=3)
    assert meta.is_decode_only
    q = torch.randn(meta.num_tokens, 8, 8)
    out = torch_ops.paged_attention(q, kv, meta, 0.35)
    torch.testing.assert_close(out.double(), dense_attention(q, keys, values, specs, 0.35), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_paged_attention_small_budget_splits_chunks_and_groups(monkeypatch, softcap):
    """With a tiny memory budget long chunks become query pieces and decodes several groups."""
    monkeypatch.setattr(torch_ops, "_GROUP_BUDGET", 512)
    meta, kv, keys, values = make_batch(MIXED, 4, 2, 12, seed=4)
    q = torch.randn(meta.num_tokens, 4, 12)
    out = torch_ops.paged_attention(q, kv, meta, 0.3, sliding_window=9, logit_softcap=softcap)
    (plan,) = [v for v in meta.step_cache.values() if isinstance(v, torch_ops._StepPlan)]
    decodes = sum(1 for _, new in MIXED if new == 1)
    assert len(plan.chunks) > len(MIXED) - decodes  # chunks were cut into several pieces
    assert 1 < len(plan.decodes) < decodes + 1  # and the decodes split into groups
    ref = dense_attention(q, keys, values, MIXED, 0.3, window=9, softcap=softcap)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_bf16():
    # Inputs are identical bf16 values in both; the op computes in fp32 and rounds its output to
    # bf16 (8 mantissa bits, relative step 2**-8), so only that final rounding separates them.
    meta, kv, keys, values = make_batch(MIXED, 4, 2, 8, dtype=torch.bfloat16, seed=5)
    q = torch.randn(meta.num_tokens, 4, 8).bfloat16()
    out = torch_ops.paged_attention(q, kv, meta, 8**-0.5, sliding_window=7)
    assert out.dtype == torch.bfloat16
    ref = dense_attention(q, keys, values, MIXED, 8**-0.5, window=7)
    torch.testing.assert_close(out.double(), ref, rtol=8e-3, atol=8e-3)


def test_paged_attention_matches_sdpa_on_one_prompt():
    """A whole prompt in one chunk is plain causal attention: compare with torch's SDPA."""
    meta, kv, keys, values = make_batch([(23, 23)], 4, 2, 8, seed=6)
    q = torch.randn(23, 4, 8)
    out = torch_ops.paged_attention(q, kv, meta, 8**-0.5)
    k = keys[0].repeat_interleave(2, dim=1).transpose(0, 1)  # [H, 23, D]
    v = values[0].repeat_interleave(2, dim=1).transpose(0, 1)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,softcap", [(None, None), (50, 30.0)])
def test_paged_attention_matches_hf_eager_attention(window, softcap):
    """HF's eager path (Gemma2's, which has softcap) on one prompt. With softcap the op follows
    eager's order of operations (bit-identical on x86 MKL today); without, the chunk goes through
    SDPA's fused kernel (online softmax), a few ulps away. The tolerance allows a few ulps."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    n, H, Hkv, D = 90, 8, 2, 64
    meta, kv, keys, values = make_batch([(n, n)], 16, Hkv, D, seed=7)
    q = torch.randn(n, H, D)
    i = torch.arange(n)
    hidden = i[None, :] > i[:, None]
    if window is not None:
        hidden |= i[:, None] - i[None, :] >= window
    mask = torch.zeros(n, n).masked_fill(hidden, torch.finfo(torch.float32).min)
    module = types.SimpleNamespace(num_key_value_groups=H // Hkv, training=False, head_dim=D)
    ref, _ = eager_attention_forward(
        module, q.transpose(0, 1)[None], keys[0].transpose(0, 1)[None], values[0].transpose(0, 1)[None],
        mask[None, None], scaling=D**-0.5, softcap=softcap,
    )  # [1, n, H, D]
    out = torch_ops.paged_attention(q, kv, meta, D**-0.5, sliding_window=window, logit_softcap=softcap)
    torch.testing.assert_close(out, ref[0], rtol=1e-6, atol=1e-6)


# ---- rotary -------------------------------------------------------------------------------------
def hf_rope(head_dim, max_positions=512, **rope):
    """HF LlamaRotaryEmbedding for a given head size and rope parameters."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **rope},
    )
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rope", [{}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}], ids=["default", "yarn"]
)
def test_rotary_is_bit_exact_with_hf(dtype, rope):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    D = 16
    hf = hf_rope(D, **rope)
    cos_sin = torch_ops.build_cos_sin_cache(hf.inv_freq, 512, hf.attention_scaling)
    positions = torch.tensor([0, 1, 2, 5, 77, 300, 511, 3])
    q, k = torch.randn(8, 4, D).to(dtype), torch.randn(8, 2, D).to(dtype)
    cos, sin = hf(q, positions[None])  # [1, T, D] in q.dtype
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
    q_out, k_out = torch_ops.rotary(q, k, positions, cos_sin)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


@pytest.mark.parametrize("rotary_dim,interleaved", [(None, False), (8, False), (8, True)])
def test_rotary_of_fused_qkv_views_equals_separate_tensors(rotary_dim, interleaved):
    """q and k split from one fused qkv projection are rotated in one pass; same bits as apart."""
    T, H, Hkv, D = 9, 4, 2, 12
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim or D, 2).float() / (rotary_dim or D)))
    cos_sin = torch_ops.build_cos_sin_cache(inv_freq, 64)
    positions = torch.tensor([0, 1, 2, 3, 40, 41, 7, 63, 5])
    qkv = torch.randn(T, (H + 2 * Hkv) * D)
    q, k, _ = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    q, k = q.view(T, H, D), k.view(T, Hkv, D)
    assert torch_ops._joint_qk(q, k) is not None
    before = qkv.clone()
    q_out, k_out = torch_ops.rotary(q, k, positions, cos_sin, rotary_dim=rotary_dim, interleaved=interleaved)
    q_ref, k_ref = torch_ops.rotary(q.contiguous(), k.contiguous(), positions, cos_sin, rotary_dim, interleaved)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert torch.equal(qkv, before)  # the input is left alone


def test_rotary_partial_matches_hf_on_the_rotated_part():
    """Phi style: only the first rotary_dim features rotate, the rest pass through."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    D, rotary_dim = 12, 8
    hf = hf_rope(rotary_dim)
    cos_sin = torch_ops.build_cos_sin_cache(hf.inv_freq, 512)
    positions = torch.tensor([4, 0, 9, 130])
    q, k = torch.randn(4, 3, D), torch.randn(4, 1, D)
    cos, sin = hf(q, positions[None])
    q_rot, k_rot = apply_rotary_pos_emb(q[..., :rotary_dim], k[..., :rotary_dim], cos[0], sin[0], unsqueeze_dim=1)
    q_out, k_out = torch_ops.rotary(q, k, positions, cos_sin, rotary_dim=rotary_dim)
    assert torch.equal(q_out[..., :rotary_dim], q_rot) and torch.equal(k_out[..., :rotary_dim], k_rot)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
    assert torch.equal(k_out[..., rotary_dim:], k[..., rotary_dim:])


def test_rotary_interleaved_rotates_adjacent_pairs():
    """GPT-J style: pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1], turned by angle p*f_i."""
    D, rotary_dim = 10, 8
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    cos_sin = torch_ops.build_cos_sin_cache(inv_freq, 64)
    positions = torch.tensor([0, 7, 63, 1, 30])
    q, k = torch.randn(5, 2, D), torch.randn(5, 2, D)
    q_out, k_out = torch_ops.rotary(q, k, positions, cos_sin, rotary_dim=rotary_dim, interleaved=True)
    angle = positions[:, None].double() * inv_freq.double()  # [T, rotary_dim/2]
    turn = torch.polar(torch.ones_like(angle), angle)[:, None, :]
    for x, got in ((q, q_out), (k, k_out)):
        pairs = torch.view_as_complex(x[..., :rotary_dim].double().reshape(5, 2, rotary_dim // 2, 2).contiguous())
        want = torch.view_as_real(pairs * turn).reshape(5, 2, rotary_dim)
        torch.testing.assert_close(got[..., :rotary_dim].double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])


def test_cos_sin_cache_layout():
    inv_freq = torch.tensor([1.0, 0.1, 0.01])
    cache = torch_ops.build_cos_sin_cache(inv_freq, 10, attention_scaling=2.0, dtype=torch.bfloat16)
    assert cache.shape == (10, 6) and cache.dtype == torch.bfloat16
    angle = torch.arange(10.0)[:, None] * inv_freq
    torch.testing.assert_close(cache.float(), torch.cat((angle.cos(), angle.sin()), -1).mul(2).bfloat16().float())


# ---- norms and activations ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_exact_with_llama(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(7, 24).to(dtype), torch.randn(7, 24).to(dtype)
    with torch.no_grad():
        assert torch.equal(torch_ops.rms_norm(x, norm.weight, 1e-5), norm(x))
        normed, summed = torch_ops.rms_norm(x, norm.weight, 1e-5, residual=r)
        assert torch.equal(summed, x + r) and torch.equal(normed, norm(x + r))


@pytest.mark.parametrize("hidden", [256, 4096])
def test_rms_norm_fp32_is_exact_with_llama_across_scales(hidden):
    """The float32 path skips HF's no-op casts and reuses buffers; the bits must not move."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        for scale in (1e-3, 1.0, 30.0):
            x, r = torch.randn(33, hidden) * scale, torch.randn(33, hidden) * scale
            assert torch.equal(torch_ops.rms_norm(x, norm.weight, 1e-5), norm(x))
            normed, summed = torch_ops.rms_norm(x, norm.weight, 1e-5, residual=r)
            assert torch.equal(normed, norm(x + r)) and torch.equal(summed, x + r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_exact_with_gemma2(dtype):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    norm = Gemma2RMSNorm(24, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(7, 24).to(dtype), torch.randn(7, 24).to(dtype)
    with torch.no_grad():
        assert torch.equal(torch_ops.rms_norm(x, norm.weight, 1e-6, weight_offset=1.0), norm(x))
        normed, summed = torch_ops.rms_norm(x, norm.weight, 1e-6, residual=r, weight_offset=1.0)
        assert torch.equal(summed, x + r) and torch.equal(normed, norm(x + r))


def test_layer_norm_with_and_without_residual():
    ln = torch.nn.LayerNorm(20, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
        x, r = torch.randn(3, 20), torch.randn(3, 20)
        assert torch.equal(torch_ops.layer_norm(x, ln.weight, ln.bias, 1e-5), ln(x))
        normed, summed = torch_ops.layer_norm(x, ln.weight, ln.bias, 1e-5, residual=r)
        assert torch.equal(summed, x + r) and torch.equal(normed, ln(x + r))
        no_bias = torch_ops.layer_norm(x, ln.weight, None, 1e-5)
        torch.testing.assert_close(no_bias, ln(x) - ln.bias)


def test_silu_and_mul():
    x = torch.randn(5, 3, 16)
    assert torch.equal(torch_ops.silu_and_mul(x), F.silu(x[..., :8]) * x[..., 8:])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul(approximate):
    x = torch.randn(6, 10)
    want = F.gelu(x[..., :5], approximate=approximate) * x[..., 5:]
    assert torch.equal(torch_ops.gelu_and_mul(x, approximate), want)
