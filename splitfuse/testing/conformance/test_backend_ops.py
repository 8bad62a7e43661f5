"""Every backend op against the cpu reference on awkward shapes, in each dtype the backend declares:
the attention building blocks (write_kv, paged_attention, rotary_write_kv) each on its own, then
the composites models call (attention, rotary_attention), then the dense ops and sampling.

Shapes: odd sizes (9, 41), contexts ending on and just past a KV block boundary, GQA ratios 1, 2,
3 and 8, prompt chunks on top of cached context mixed with decodes in one ragged batch; KV blocks
shuffled and NaN wherever no sequence wrote, so reading a wrong slot shows.
"""

from __future__ import annotations

import pytest
import torch

from splitfuse.backends import Backend
from splitfuse.config import EngineConfig
from splitfuse.core.sampler import SamplingBatch
from splitfuse.quant.weights import FORMATS
from splitfuse.testing.conformance.tolerances import assert_close
from splitfuse.testing.ragged import filled_cache, ragged_step

FULL = pytest.mark.splitfuse_full  # left out by --splitfuse-quick

# (context_len incl. new tokens, new tokens) per sequence
MIXED = [(1, 1), (9, 1), (17, 17), (40, 7), (33, 1), (5, 5), (16, 16), (32, 1), (38, 20), (2, 1)]
DECODES = [(9, 1), (16, 1), (17, 1), (64, 1), (1, 1)]
LONG_CHUNK = [(70, 70), (64, 30)]
SMALL = [(1, 1), (6, 1), (9, 5), (4, 4)]  # quick: a decode, a chunk on cached context, a whole prompt

# (specs, block_size, H, Hkv, D): MHA, GQA 2 and 3 with odd head sizes, MQA
ATTENTION_SHAPES = [
    pytest.param(SMALL, 4, 4, 2, 8, id="quick-gqa2"),
    pytest.param(MIXED, 1, 4, 4, 8, id="mixed-block1-mha", marks=FULL),
    pytest.param(MIXED, 4, 4, 2, 12, id="mixed-block4-gqa2-d12", marks=FULL),
    pytest.param(MIXED, 16, 6, 2, 16, id="mixed-block16-gqa3", marks=FULL),
    pytest.param(DECODES, 16, 8, 1, 8, id="decodes-block16-mqa", marks=FULL),
    pytest.param(LONG_CHUNK, 16, 4, 2, 24, id="long-chunks-block16-d24", marks=FULL),
]
# (sliding_window, logit_softcap)
ATTENTION_VARIANTS = [
    pytest.param(None, None, id="causal"),
    pytest.param(5, None, id="window5", marks=FULL),
    pytest.param(None, 2.0, id="softcap2", marks=FULL),
]


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _step(specs, block_size, Hkv, D, dtype, seed=0):
    """A ragged step, its filled cache, and new K/V for the step's tokens (different from the cache)."""
    step = ragged_step(specs, block_size, seed)
    kv, _, _ = filled_cache(step, Hkv, D, dtype, seed)
    T = step.meta.num_tokens
    return step.meta, kv, _randn(T, Hkv, D, dtype=dtype, seed=seed + 7), _randn(T, Hkv, D, dtype=dtype, seed=seed + 8)


def _cos_sin(rotary_dim: int, max_positions: int = 128) -> torch.Tensor:
    from splitfuse.backends.torch_ops import build_cos_sin_cache

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    return build_cos_sin_cache(inv_freq, max_positions)


# ---- the contract's non-op members ---------------------------------------------------------------
def test_declares_a_usable_contract(backend):
    assert backend.dtypes, "dtypes must name at least one dtype"
    assert backend.default_dtype() in backend.dtypes
    assert backend.unavailable_reason() == "" and backend.is_available()
    assert isinstance(backend.auto_selectable(), bool)
    assert backend.device_count() >= 1
    assert backend.device_type() == backend.device.type, "device_type() names the type of `device`"
    name = backend.distributed_backend()
    assert isinstance(name, str) and name, "distributed_backend() names a torch.distributed backend (\"gloo\", ...)"
    size = backend.kv_block_size(64)
    assert isinstance(size, int) and size >= 1
    blocks = backend.num_kv_blocks(EngineConfig(kv_cache_gib=0.01), 1 << 16, 64)
    assert isinstance(blocks, int) and blocks >= 1
    unknown = set(backend.quantized_formats) - set(FORMATS)
    assert not unknown, f"quantized_formats names {sorted(unknown)}; formats are {FORMATS}"


def test_allocates_the_kv_cache_layout(backend, dtype):
    cache = backend.allocate_kv_cache(3, 5, 4, 2, 8, dtype)
    assert len(cache) == 3
    for layer in cache:
        assert layer.shape == (2, 5, 4, 2, 8) and layer.dtype == dtype and layer.device.type == backend.device.type
        assert layer.is_contiguous()


def test_prepare_batch_moves_the_step_to_the_device(backend):
    meta = backend.prepare_batch(ragged_step(MIXED, 4).meta)
    for name in ("input_ids", "positions", "query_start", "context_lens", "block_tables", "slot_mapping"):
        assert getattr(meta, name).device.type == backend.device.type, name


# ---- attention: building blocks ------------------------------------------------------------------
ROTARY_VARIANTS = [
    pytest.param(None, False, id="neox"),
    pytest.param(8, False, id="partial", marks=FULL),
    pytest.param(None, True, id="gptj", marks=FULL),
]
ROTARY_STEPS = [pytest.param(SMALL, 4, id="quick"), pytest.param(MIXED, 16, id="mixed-block16", marks=FULL)]


def _fused_qkv(T, H, Hkv, D, dtype, device="cpu"):
    """q, k, v as models make them: views of one projection's output (k and v not contiguous)."""
    qkv = _randn(T, (H + 2 * Hkv) * D, dtype=dtype, seed=4).to(device)
    return tuple(t.view(T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-qkv-views"])
@pytest.mark.parametrize("specs,block_size,H,Hkv,D", ATTENTION_SHAPES)
def test_write_kv(backend, reference, dtype, specs, block_size, H, Hkv, D, fused):
    meta, kv, k, v = _step(specs, block_size, Hkv, D, dtype)
    if fused:
        _, k, v = _fused_qkv(meta.num_tokens, H, Hkv, D, dtype)
    expected_kv = kv.clone()
    reference.write_kv(expected_kv, k, v, meta.slot_mapping)
    dev = backend.device
    got_kv = kv.to(dev)
    backend.write_kv(got_kv, k.to(dev), v.to(dev), backend.prepare_batch(meta).slot_mapping)
    assert_close(got_kv, expected_kv, dtype, "KV cache after write_kv (k/v at slot_mapping, nothing else)")


def _check_attention_op(backend, reference, dtype, op, specs, block_size, H, Hkv, D, window, softcap, cache_note):
    """`op` on the backend against the reference, output and KV cache afterwards: "attention" (writes
    the step's new K/V first) or "paged_attention" (over a cache already holding them)."""
    meta, kv, k, v = _step(specs, block_size, Hkv, D, dtype)
    q = _randn(meta.num_tokens, H, D, dtype=dtype, seed=3)
    new_kv = (k, v) if op == "attention" else ()
    expected_kv = kv.clone()
    expected = getattr(reference, op)(q, *new_kv, expected_kv, meta, D ** -0.5, window, softcap)
    dev = backend.device
    got_kv = kv.to(dev)
    got = getattr(backend, op)(q.to(dev), *(t.to(dev) for t in new_kv), got_kv, backend.prepare_batch(meta),
                               D ** -0.5, window, softcap)
    assert got.dtype == dtype
    assert_close(got, expected, dtype, f"{op} output")
    assert_close(got_kv, expected_kv, dtype, f"KV cache after {op} ({cache_note})")


@pytest.mark.parametrize("window,softcap", ATTENTION_VARIANTS)
@pytest.mark.parametrize("specs,block_size,H,Hkv,D", ATTENTION_SHAPES)
def test_paged_attention(backend, reference, dtype, specs, block_size, H, Hkv, D, window, softcap):
    """Over a cache that already holds the step's keys; the cache is only read."""
    _check_attention_op(backend, reference, dtype, "paged_attention", specs, block_size, H, Hkv, D, window, softcap,
                        "unchanged")


def _check_rotary_op(backend, reference, dtype, op, specs, block_size, rotary_dim, interleaved):
    """`op` on the backend against the reference, output and KV cache afterwards: "rotary_write_kv"
    or "rotary_attention" (which attends as well), on q, k, v as models make them."""
    H, Hkv, D = 4, 2, 16
    meta, kv, _, _ = _step(specs, block_size, Hkv, D, dtype)
    cos_sin = _cos_sin(rotary_dim or D).to(dtype)

    def run(ops, kv_layer, meta, device):
        q, k, v = _fused_qkv(meta.num_tokens, H, Hkv, D, dtype, device)
        where = (meta.slot_mapping,) if op == "rotary_write_kv" else (meta, D ** -0.5)
        return getattr(ops, op)(q, k, v, meta.positions, cos_sin.to(device), kv_layer, *where,
                                rotary_dim=rotary_dim, interleaved=interleaved)

    expected_kv = kv.clone()
    expected = run(reference, expected_kv, meta, "cpu")
    got_kv = kv.to(backend.device)
    got = run(backend, got_kv, backend.prepare_batch(meta), backend.device)
    assert_close(got, expected, dtype, f"{op} output")
    assert_close(got_kv, expected_kv, dtype, f"KV cache after {op} (rotated keys, values at slot_mapping)")


@pytest.mark.parametrize("rotary_dim,interleaved", ROTARY_VARIANTS)
@pytest.mark.parametrize("specs,block_size", ROTARY_STEPS)
def test_rotary_write_kv(backend, reference, dtype, specs, block_size, rotary_dim, interleaved):
    """Returns the rotated q."""
    _check_rotary_op(backend, reference, dtype, "rotary_write_kv", specs, block_size, rotary_dim, interleaved)


# ---- attention: the composites models call ------------------------------------------------------
@pytest.mark.parametrize("window,softcap", ATTENTION_VARIANTS)
@pytest.mark.parametrize("specs,block_size,H,Hkv,D", ATTENTION_SHAPES)
def test_attention(backend, reference, dtype, specs, block_size, H, Hkv, D, window, softcap):
    _check_attention_op(backend, reference, dtype, "attention", specs, block_size, H, Hkv, D, window, softcap,
                        "new K/V at slot_mapping, nothing else")


@pytest.mark.parametrize("rotary_dim,interleaved", ROTARY_VARIANTS)
@pytest.mark.parametrize("specs,block_size", ROTARY_STEPS)
def test_rotary_attention_from_a_fused_qkv(backend, reference, dtype, specs, block_size, rotary_dim,
                                           interleaved):
    _check_rotary_op(backend, reference, dtype, "rotary_attention", specs, block_size, rotary_dim, interleaved)


@pytest.mark.parametrize("T,H,Hkv,D,rotary_dim,interleaved", [
    pytest.param(9, 4, 2, 16, None, False, id="neox"),
    pytest.param(41, 6, 2, 24, 12, False, id="partial", marks=FULL),
    pytest.param(1, 4, 4, 8, None, True, id="gptj-one-token", marks=FULL),
    pytest.param(33, 8, 1, 32, 16, True, id="gptj-partial-mqa", marks=FULL),
])
def test_rotary(backend, reference, dtype, T, H, Hkv, D, rotary_dim, interleaved):
    q, k = _randn(T, H, D, dtype=dtype, seed=5), _randn(T, Hkv, D, dtype=dtype, seed=6)
    positions = torch.randperm(100, generator=torch.Generator().manual_seed(T))[:T]  # any order, gaps
    cos_sin = _cos_sin(rotary_dim or D).to(dtype)
    expected_q, expected_k = reference.rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
    dev = backend.device
    got_q, got_k = backend.rotary(q.to(dev), k.to(dev), positions.to(dev), cos_sin.to(dev), rotary_dim, interleaved)
    assert_close(got_q, expected_q, dtype, "rotary q")
    assert_close(got_k, expected_k, dtype, "rotary k")


# ---- dense ops -----------------------------------------------------------------------------------
SHAPES = [pytest.param((9, 41), id="9x41"), pytest.param((1, 8), id="1x8", marks=FULL),
          pytest.param((33, 64), id="33x64", marks=FULL)]


@pytest.mark.parametrize("weight_offset", [0.0, pytest.param(1.0, marks=FULL)], ids=["llama", "gemma"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(backend, reference, dtype, shape, with_residual, weight_offset):
    x, w = _randn(*shape, dtype=dtype, seed=1, scale=3.0), _randn(shape[-1], dtype=dtype, seed=2, scale=0.1) + 1
    residual = _randn(*shape, dtype=dtype, seed=9) if with_residual else None
    expected = reference.rms_norm(x, w, 1e-5, residual, weight_offset)
    dev = backend.device
    got = backend.rms_norm(x.to(dev), w.to(dev), 1e-5, None if residual is None else residual.to(dev), weight_offset)
    _check_norm(got, expected, dtype, "rms_norm", with_residual)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(backend, reference, dtype, shape, with_residual, with_bias):
    x, w = _randn(*shape, dtype=dtype, seed=1, scale=3.0), _randn(shape[-1], dtype=dtype, seed=2, scale=0.1) + 1
    b = _randn(shape[-1], dtype=dtype, seed=3) if with_bias else None
    residual = _randn(*shape, dtype=dtype, seed=9) if with_residual else None
    expected = reference.layer_norm(x, w, b, 1e-5, residual)
    dev = backend.device
    got = backend.layer_norm(x.to(dev), w.to(dev), None if b is None else b.to(dev), 1e-5,
                             None if residual is None else residual.to(dev))
    _check_norm(got, expected, dtype, "layer_norm", with_residual)


def _check_norm(got, expected, dtype, name, with_residual):
    if not with_residual:
        assert_close(got, expected, dtype, name)
        return
    assert isinstance(got, tuple) and len(got) == 2, f"{name} with a residual returns (normed, x + residual)"
    assert_close(got[0], expected[0], dtype, f"{name} normed")
    assert_close(got[1], expected[1], dtype, f"{name} x + residual")


ACTIVATION_SHAPES = [pytest.param((5, 18), id="5x18"), pytest.param((1, 2), id="1x2", marks=FULL),
                     pytest.param((33, 82), id="33x82", marks=FULL)]


@pytest.mark.parametrize("op,kwargs", [
    ("silu_and_mul", {}), ("gelu_and_mul", {"approximate": "none"}), ("gelu_and_mul", {"approximate": "tanh"}),
    ("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"}), ("relu", {}),
], ids=["silu_and_mul", "gelu_and_mul", "gelu_and_mul-tanh", "gelu", "gelu-tanh", "relu"])
@pytest.mark.parametrize("shape", ACTIVATION_SHAPES)
def test_activation(backend, reference, dtype, op, kwargs, shape):
    x = _randn(*shape, dtype=dtype, seed=11, scale=3.0)
    expected = getattr(reference, op)(x, **kwargs)
    got = getattr(backend, op)(x.to(backend.device), **kwargs)
    assert_close(got, expected, dtype, op)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("T,K,N", [pytest.param(9, 41, 33, id="9x41x33"),
                                   pytest.param(1, 64, 96, id="1x64x96", marks=FULL)])
def test_linear(backend, reference, dtype, T, K, N, with_bias):
    x, w = _randn(T, K, dtype=dtype, seed=1), _randn(N, K, dtype=dtype, seed=2, scale=K ** -0.5)
    b = _randn(N, dtype=dtype, seed=3) if with_bias else None
    dev = backend.device
    got = backend.linear(x.to(dev), w.to(dev), None if b is None else b.to(dev))
    assert_close(got, reference.linear(x, w, b), dtype, "linear")


# Quantized weights: run for the formats the backend claims in `quantized_formats` (conftest.py
# deselects the rest). int8: symmetric, one scale per output channel; int4: asymmetric groups
# along K with zero points (groups of 32 when K = 96, 128 when K = 256). The reference is the
# dequantized matrix's matmul in float32. (format, T, K, N): cpu runs int8 "9x41x33" through the
# dequantize fallback (K not a multiple of 8) and int4 "9x96x48" through torch's int4 kernel (N a
# multiple of 16)
QUANTIZED_LINEAR_SHAPES = [
    pytest.param("int8", 9, 41, 33, id="int8-9x41x33"),
    pytest.param("int4", 9, 96, 48, id="int4-9x96x48"),
    pytest.param("int8", 1, 64, 96, id="int8-1x64x96", marks=FULL),
    pytest.param("int4", 1, 256, 32, id="int4-1x256x32", marks=FULL),
    pytest.param("int4", 3, 256, 33, id="int4-3x256x33", marks=FULL),
]


def _quantized_linear_case(fmt, T, K, N, dtype, with_bias):
    from splitfuse.quant import quantize

    x, w = _randn(T, K, dtype=dtype, seed=1), _randn(N, K, dtype=dtype, seed=2, scale=K ** -0.5)
    b = _randn(N, dtype=dtype, seed=3) if with_bias else None
    return x, quantize(w, fmt), b


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fmt,T,K,N", QUANTIZED_LINEAR_SHAPES)
def test_quantized_linear(backend, dtype, fmt, T, K, N, with_bias):
    """linear with a weight-only QuantizedWeight, in the layout the backend prepares, equals the
    float32 matmul with the dequantized matrix (within the dtype's tolerance)."""
    x, weight, b = _quantized_linear_case(fmt, T, K, N, dtype, with_bias)
    dev = backend.device
    prepared = backend.prepare_linear_weight(weight.to(dev))
    got = backend.linear(x.to(dev), prepared, None if b is None else b.to(dev))
    expected = x.float() @ weight.dequantize(torch.float32).T + (0 if b is None else b.float())
    assert got.dtype == dtype, f"linear ({fmt} weight) returns {got.dtype}, expected x's dtype {dtype}"
    assert_close(got, expected, dtype, f"linear ({fmt} weight)")


@pytest.mark.parametrize("fmt,T,K,N", QUANTIZED_LINEAR_SHAPES[:2])
def test_prepare_linear_weight_keeps_the_matrix(backend, fmt, T, K, N):
    """The backend's layout of a quantized weight stands for the same matrix, format and shape."""
    _, weight, _ = _quantized_linear_case(fmt, T, K, N, torch.float32, False)
    prepared = backend.prepare_linear_weight(weight.to(backend.device))
    assert (prepared.format, prepared.shape, prepared.device.type) == (fmt, weight.shape, backend.device.type)
    torch.testing.assert_close(prepared.dequantize(torch.float32).cpu(), weight.dequantize(torch.float32),
                               rtol=1e-6, atol=1e-6)


def test_embedding(backend, reference, dtype):
    weight = _randn(37, 24, dtype=dtype, seed=1)
    ids = torch.tensor([0, 36, 5, 5, 17, 0, 36, 1, 2])  # first and last rows, repeats
    got = backend.embedding(ids.to(backend.device), weight.to(backend.device))
    assert_close(got, reference.embedding(ids, weight), dtype, "embedding")


# ---- mixture of experts --------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(Backend, "moe_route"), reason="this splitfuse has no mixture-of-experts ops")
@pytest.mark.parametrize("renormalize", [True, False], ids=["renormalized", "raw"])
def test_moe_route(backend, reference, dtype, renormalize):
    logits = _randn(9, 6, dtype=dtype, seed=2, scale=2.0)
    expected_w, expected_ids = reference.moe_route(logits, 2, renormalize)
    got_w, got_ids = backend.moe_route(logits.to(backend.device), 2, renormalize)
    assert got_ids.cpu().tolist() == expected_ids.tolist()
    assert_close(got_w, expected_w, torch.float32, "moe_route weights (a float32 softmax in every dtype)")


@pytest.mark.skipif(not hasattr(Backend, "moe_experts"), reason="this splitfuse has no mixture-of-experts ops")
@pytest.mark.parametrize("activation", ["silu", pytest.param("gelu_tanh", marks=FULL)])
def test_moe_experts(backend, reference, dtype, activation):
    T, H, inter, E, K = 9, 16, 12, 4, 2  # tokens, hidden, expert intermediate size, experts, experts per token
    x = _randn(T, H, dtype=dtype, seed=1)
    ids = torch.stack([torch.arange(T) % E, (torch.arange(T) * 3 + 1) % E], dim=1)
    weights = torch.softmax(_randn(T, K, seed=2), dim=-1)
    w_gate_up = _randn(E, 2 * inter, H, dtype=dtype, seed=3, scale=0.25)
    w_down = _randn(E, H, inter, dtype=dtype, seed=4, scale=0.25)
    expected = reference.moe_experts(x, weights, ids, w_gate_up, w_down, activation)
    dev = backend.device
    got = backend.moe_experts(x.to(dev), weights.to(dev), ids.to(dev), w_gate_up.to(dev), w_down.to(dev), activation)
    assert_close(got, expected, dtype, "moe_experts")


# ---- sampling ------------------------------------------------------------------------------------
def _sampling_batch(rows: list[dict]) -> SamplingBatch:
    return SamplingBatch(
        temperatures=[r["temperature"] for r in rows], top_ks=[r.get("top_k", 0) for r in rows],
        top_ps=[r.get("top_p", 1.0) for r in rows],
        seeds=[None if r["temperature"] == 0 else r.get("seed", 0) for r in rows],
        counters=[r.get("counter", 0) for r in rows], suppressed=[r.get("suppressed", []) for r in rows],
    )


def test_sample_greedy_and_suppressed(backend):
    logits = _randn(4, 257, seed=1, scale=3.0)
    top = logits.argmax(-1)
    batch = _sampling_batch([{"temperature": 0.0}, {"temperature": 0.0, "suppressed": [int(top[1])]},
                             {"temperature": 0.0}, {"temperature": 0.0, "suppressed": [2, int(top[3])]}])
    got = backend.sample(logits.to(backend.device), batch)
    assert got.dtype == torch.int64 and got.shape == (4,)
    masked = logits.clone()
    masked[1, top[1]] = masked[3, top[3]] = masked[3, 2] = float("-inf")
    assert got.cpu().tolist() == masked.argmax(-1).tolist()


def test_sample_respects_filters_and_seeds(backend):
    logits = _randn(5, 257, seed=2, scale=3.0)
    rows = [
        {"temperature": 0.0},
        {"temperature": 0.8, "top_k": 1, "seed": 1},  # top-k 1 is greedy whatever the temperature
        {"temperature": 1.0, "top_p": 1e-4, "seed": 2},  # a tiny nucleus holds only the top token
        {"temperature": 1.5, "top_k": 5, "seed": 3, "counter": 7},
        {"temperature": 1.0, "top_k": 8, "seed": 4, "suppressed": [int(logits[4].argmax())]},  # ranks 2-9
    ]
    first = backend.sample(logits.to(backend.device), _sampling_batch(rows)).cpu().tolist()
    again = backend.sample(logits.to(backend.device), _sampling_batch(rows)).cpu().tolist()
    assert first == again, "the same seeds and counters must give the same tokens"
    top = logits.argmax(-1).tolist()
    assert first[:3] == top[:3]
    assert first[3] in logits[3].topk(5).indices.tolist()
    assert first[4] in logits[4].topk(9).indices.tolist() and first[4] != top[4]
