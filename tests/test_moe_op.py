"""The mixture-of-experts ops: grouped experts against a per-token reference, and routing (ties
included) against transformers' own MoE blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitfuse.backends import torch_ops
from splitfuse.backends.cpu import CpuBackend


def naive_moe(x, weights, ids, w_gate_up, w_down, act=F.silu):
    """One token and one chosen expert at a time: the definition, not the fast path."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k]
            gate, up = (w_gate_up[e].float() @ x[t].float()).chunk(2)
            out[t] += weights[t, k].float() * (w_down[e].float() @ (act(gate) * up))
    return out


def random_moe(T, H, inter, E, K, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w_gate_up = (torch.randn(E, 2 * inter, H, generator=gen) / H ** 0.5).to(dtype)
    w_down = (torch.randn(E, H, inter, generator=gen) / inter ** 0.5).to(dtype)
    logits = torch.randn(T, E, generator=gen)
    weights, ids = torch_ops.moe_route(logits, K, renormalize=True)
    return x, weights, ids, w_gate_up, w_down


# (tokens, hidden, intermediate, experts, top_k): awkward sizes, one token, every expert chosen,
# top-1, and more experts than tokens (some experts get no token at all)
SHAPES = [(9, 24, 10, 5, 2), (1, 16, 8, 4, 2), (7, 12, 6, 3, 3), (13, 8, 5, 6, 1), (3, 20, 12, 8, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_experts_match_per_token_reference(shape):
    x, weights, ids, w_gate_up, w_down = random_moe(*shape)
    got = torch_ops.moe_experts(x, weights, ids, w_gate_up, w_down)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, naive_moe(x, weights, ids, w_gate_up, w_down), rtol=1e-5, atol=1e-5)


def test_experts_bf16_and_gelu():
    x, weights, ids, w_gate_up, w_down = random_moe(11, 32, 16, 4, 2, dtype=torch.bfloat16)
    got = torch_ops.moe_experts(x, weights, ids, w_gate_up, w_down)
    assert got.dtype == torch.bfloat16
    # bf16 rounds the matmul inputs and outputs: a few bf16 ulps of |out| ~ 1
    torch.testing.assert_close(got.float(), naive_moe(x, weights, ids, w_gate_up, w_down), rtol=3e-2, atol=3e-2)
    x, weights, ids, w_gate_up, w_down = random_moe(6, 16, 8, 4, 2)
    got = torch_ops.moe_experts(x, weights, ids, w_gate_up, w_down, activation="gelu")
    ref = naive_moe(x, weights, ids, w_gate_up, w_down, act=F.gelu)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_backend_op_empty_batch_and_bad_activation():
    backend = CpuBackend()
    x, weights, ids, w_gate_up, w_down = random_moe(4, 8, 4, 3, 2)
    torch.testing.assert_close(backend.moe_experts(x, weights, ids, w_gate_up, w_down),
                               torch_ops.moe_experts(x, weights, ids, w_gate_up, w_down))
    empty = backend.moe_experts(x[:0], weights[:0], ids[:0], w_gate_up, w_down)
    assert empty.shape == (0, 8)
    with pytest.raises(ValueError, match="activation"):
        backend.moe_experts(x, weights, ids, w_gate_up, w_down, activation="swish")


def test_route_renormalises_only_when_asked():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = torch_ops.moe_route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, dim=-1)[0]
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights[0], probs[[1, 2]])
    weights, _ = torch_ops.moe_route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights[0], probs[[1, 2]] / probs[[1, 2]].sum())


# ---- against transformers' own MoE blocks, with exact ties in the router ---------------------------
def _tied_hf_model(arch: str):
    """A one-layer HF MoE model whose router rows 0, 1, 2 are equal (so three experts tie exactly
    for two places) and row 3 is their negative."""
    import transformers

    from splitfuse.testing.tiny_model import ARCHITECTURES, TINY_DEFAULTS

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHITECTURES[arch])
    config = config_cls(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1,
                        **{**TINY_DEFAULTS[arch], "num_experts_per_tok": 2})
    if arch == "qwen2_moe":
        config.norm_topk_prob = False  # the other branch of the renormalisation (Mixtral always does it)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
        router = model.model.layers[0].mlp.gate.weight
        router[1] = router[0]
        router[2] = router[0]
        router[3] = -router[0]
    return model


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_routing_and_block_match_hf_with_ties(arch):
    from splitfuse.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM

    hf = _tied_hf_model(arch)
    block = hf.model.layers[0].mlp
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, hf_weights, hf_ids = block.gate(x)
        hf_out = block(x[None])[0]
    probs = torch.softmax(F.linear(x, block.gate.weight), dim=-1)
    assert bool((probs[:, 0] == probs[:, 2]).all()), "the router should tie experts 0-2 exactly"
    tied = probs[:, 0] > probs[:, 3]  # rows where three equal experts compete for two places
    assert tied.any()

    backend = CpuBackend()
    renormalize = arch == "mixtral" or hf.config.norm_topk_prob
    weights, ids = backend.moe_route(F.linear(x, block.gate.weight), 2, renormalize)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights.to(hf_weights.dtype), hf_weights, rtol=0, atol=0)

    # the whole block, loaded from HF's in-memory (stacked) expert layout
    cls = MixtralForCausalLM if arch == "mixtral" else Qwen2MoeForCausalLM
    ours = cls(hf.config, backend, torch.float32, 64)
    ours.load_weights(hf.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(ours.mlp(0, x), hf_out, rtol=1e-5, atol=1e-5)
