"""Grouped mixture-of-experts Triton kernel against torch_ops.moe_experts."""

from __future__ import annotations

import random

import pytest
import torch

import splitfuse
from splitfuse.backends import torch_ops
from splitfuse.backends.triton.moe import _sort_pairs, moe_experts
from splitfuse.testing.parity import hf_greedy, mismatch

# fp32: the same products summed in another order (tiles of 32 vs one BLAS call), IEEE not TF32
FP32 = dict(rtol=1e-5, atol=2e-5)
# bf16: the kernel rounds gate/up, the activation and the product as torch does, but a different
# summation order can flip a rounding of h, and the interpreter truncates float32 -> bf16 where
# torch rounds: a few bf16 ulps of outputs ~1
BF16 = dict(rtol=3e-2, atol=3e-2)


def random_moe(T, H, inter, E, K, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    w_gate_up = torch.randn(E, 2 * inter, H, generator=gen) / H ** 0.5
    w_down = torch.randn(E, H, inter, generator=gen) / inter ** 0.5
    weights, ids = torch_ops.moe_route(torch.randn(T, E, generator=gen), K, renormalize=True)
    return [t.to(device) for t in (x.to(dtype), weights, ids, w_gate_up.to(dtype), w_down.to(dtype))]


# (tokens, hidden, intermediate, experts, top_k): sizes that are not tile multiples, one token,
# every expert chosen (top-3 of 3), top-1, and experts that get no token; 37 tokens x 2 pairs span
# several 16-row tiles per expert
SHAPES = [(9, 24, 10, 5, 2), (1, 16, 8, 4, 2), (7, 12, 6, 3, 3), (13, 40, 5, 6, 1), (3, 20, 12, 8, 2),
          (37, 72, 41, 4, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, shape, dtype):
    x, weights, ids, w_gate_up, w_down = random_moe(*shape, dtype, device)
    got = moe_experts(x, weights, ids, w_gate_up, w_down)
    ref = torch_ops.moe_experts(x, weights, ids, w_gate_up, w_down)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got.float(), ref.float(), **(FP32 if dtype == torch.float32 else BF16))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gelu_activations(device, activation):
    x, weights, ids, w_gate_up, w_down = random_moe(6, 16, 8, 4, 2, torch.float32, device)
    torch.testing.assert_close(moe_experts(x, weights, ids, w_gate_up, w_down, activation),
                               torch_ops.moe_experts(x, weights, ids, w_gate_up, w_down, activation), **FP32)


def test_strided_weights_and_input(device):
    x, weights, ids, w_gate_up, w_down = random_moe(5, 16, 8, 3, 2, torch.float32, device)
    # expert weights stored transposed ([E, H, 2I] memory viewed as [E, 2I, H]) and a row-strided x
    w_gate_up_t = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    x_strided = torch.cat([x, x], dim=1)[:, :16]
    torch.testing.assert_close(moe_experts(x_strided, weights, ids, w_gate_up_t, w_down),
                               torch_ops.moe_experts(x, weights, ids, w_gate_up, w_down), **FP32)


def test_pairs_are_grouped_by_expert_in_whole_tiles(device):
    ids = torch.tensor([[3, 0], [0, 3], [1, 0], [3, 1], [0, 2]], device=device)
    pairs, block_expert = _sort_pairs(ids, num_experts=5, block_m=2)
    num_pairs = ids.numel()
    tiles, experts = pairs.view(-1, 2).tolist(), block_expert.tolist()
    flat = ids.reshape(-1).tolist()
    seen = []
    for tile, expert in zip(tiles, experts):
        real = [p for p in tile if p < num_pairs]
        if expert < 0:
            assert real == []
            continue
        assert real and all(flat[p] == expert for p in real)
        seen += real
    assert sorted(seen) == list(range(num_pairs))  # every pair exactly once
    assert experts[: experts.index(-1)] == sorted(experts[: experts.index(-1)])  # expert 4 gets no tile


def test_empty_batch_and_bad_inputs(device):
    x, weights, ids, w_gate_up, w_down = random_moe(4, 16, 8, 3, 2, torch.float32, device)
    assert moe_experts(x[:0], weights[:0], ids[:0], w_gate_up, w_down).shape == (0, 16)
    with pytest.raises(ValueError, match="activation"):
        moe_experts(x, weights, ids, w_gate_up, w_down, "swish")
    with pytest.raises(ValueError, match="w_down"):
        moe_experts(x, weights, ids, w_gate_up, w_down.transpose(1, 2))


def test_real_shapes_on_gpu(device):
    if device.type != "cuda":
        pytest.skip("real shapes only on a GPU (the interpreter is too slow)")
    # Mixtral 8x7B's MLP on a 768-token step, and a decode-sized batch of 8 tokens
    for tokens in (768, 8):
        x, weights, ids, w_gate_up, w_down = random_moe(tokens, 4096, 14336, 8, 2, torch.bfloat16, device)
        torch.testing.assert_close(moe_experts(x, weights, ids, w_gate_up, w_down).float(),
                                   torch_ops.moe_experts(x, weights, ids, w_gate_up, w_down).float(), **BF16)


@pytest.mark.slow
def test_mixtral_end_to_end_matches_hf(tmp_path, hf_model):
    """The whole tiny Mixtral on the cuda backend (its attention, norm and MoE kernels) against
    HF: one chunked prompt sharing steps with decodes."""
    pytest.importorskip("splitfuse.backends.triton.paged_attention")
    from splitfuse.testing.tiny_model import make_tiny_model

    path = str(make_tiny_model(tmp_path, "mixtral"))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 11)]
    pipe = splitfuse.pipeline(path, backend="cuda", kv_block_size=4, token_budget=8, dtype="float32")
    responses = pipe(prompts, max_new_tokens=4, temperature=0.0)
    model = hf_model(path)
    problems = [mismatch(model, p, r.token_ids, hf_greedy(model, p, 4)) for p, r in zip(prompts, responses)]
    assert [p for p in problems if p] == []
    assert pipe.engine.blocks.num_free == pipe.engine.blocks.num_blocks
