"""The Triton ragged paged-attention kernel against the plain-torch reference (torch_ops).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be
set before triton is imported), so shapes stay tiny: a few sequences, contexts up to 40, head
sizes 8-24, 16-wide tiles.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from splitfuse.backends import torch_ops  # noqa: E402
from splitfuse.backends.triton import paged_attention as pa  # noqa: E402
from splitfuse.testing.ragged import filled_cache, ragged_step  # noqa: E402

# the interpreter itself trips a numpy deprecation on every scalar it indexes with
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32: same fp32 inputs and fp32 math as the reference; only the summation order differs (online
# softmax rescaling, tiled dot products), which moves results by a few ulps, far inside 1e-5.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16/fp16: identical low-precision inputs; the reference rounds only its output, the kernel also
# rounds the softmax weights P to the input dtype for the P@V tensor-core product (FlashAttention
# practice). Two roundings of relative size 2**-9 (bf16) / 2**-12 (fp16) on outputs of magnitude
# up to ~2 give about two ulps: 2**-6 ~ 1.6e-2 for bf16, 2**-9 ~ 2e-3 for fp16.
LOW_TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}

# (context_len incl. new tokens, new tokens) per sequence: a 1-token prompt, decodes, first prompt
# chunks (one spanning several query tiles), later chunks on top of cached context
MIXED = [(1, 1), (9, 1), (17, 17), (40, 7), (33, 1), (5, 5), (23, 1), (38, 20), (2, 1)]


def make_batch(specs, block_size, num_kv_heads, head_dim, dtype=torch.float32, seed=0):
    """A ragged step over a paged cache with shuffled blocks and NaN in every slot no sequence
    wrote (reading one poisons the output). Returns (meta, kv_layer) on DEVICE."""
    step = ragged_step(specs, block_size, seed)
    kv, _, _ = filled_cache(step, num_kv_heads, head_dim, dtype, seed)
    return step.meta.to(DEVICE), kv.to(DEVICE)


def run(specs=MIXED, block_size=4, H=4, Hkv=2, D=8, dtype=torch.float32, window=None, softcap=None,
        num_splits=None, seed=0, q_scale=1.0):
    """(kernel output, reference output, meta) for one random step."""
    meta, kv = make_batch(specs, block_size, Hkv, D, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    q = (torch.randn(meta.num_tokens, H, D, generator=gen) * q_scale).to(dtype).to(DEVICE)
    scale = D**-0.5
    out = pa.paged_attention(q, kv, meta, scale, window, softcap, num_splits=num_splits)
    ref = torch_ops.paged_attention(q, kv, meta, scale, window, softcap)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()  # no NaN leaked from unused cache slots
    return out, ref, meta


# ---- correctness --------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 8), (4, 2, 12), (8, 2, 24), (6, 2, 8), (4, 1, 12)])
def test_matches_reference_fp32(block_size, H, Hkv, D):
    out, ref, _ = run(block_size=block_size, H=H, Hkv=Hkv, D=D, seed=block_size + D)
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("window,softcap", [(1, None), (5, None), (16, None), (None, 2.0), (6, 5.0)])
def test_sliding_window_and_softcap(window, softcap):
    # large logits so the softcap bites; window 1 leaves each query only itself
    out, ref, _ = run(H=4, Hkv=2, D=12, window=window, softcap=softcap, seed=1, q_scale=3.0)
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("window,softcap,block_size", [(None, None, 4), (7, None, 1), (None, 3.0, 16)])
def test_split_kv_forced(num_splits, window, softcap, block_size):
    out, ref, meta = run(block_size=block_size, H=6, Hkv=2, D=12, window=window, softcap=softcap,
                         num_splits=num_splits, seed=2, q_scale=2.0)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    # short sequences (one 16-key tile) leave their later partitions empty: those wrote max=-inf
    (part_m, part_l, _), = [v for k, v in meta.step_cache.items() if k[0] == "triton_paged_attention_splits"]
    assert part_m.shape[0] == num_splits
    assert torch.isneginf(part_m[-1]).any() and (part_l[-1] == 0).any()
    assert torch.isfinite(part_m[0]).all()  # every query sees at least one key in the first one


def test_split_kv_long_context_every_partition_used():
    """Decodes several key tiles long: each of their partitions holds keys the query sees."""
    specs = [(40, 1), (37, 1), (34, 1)]
    out, ref, meta = run(specs, block_size=4, H=4, Hkv=1, D=8, num_splits=3, seed=3)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    (part_m, _, _), = [v for k, v in meta.step_cache.items() if k[0] == "triton_paged_attention_splits"]
    assert torch.isfinite(part_m).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [None, 2])
def test_low_precision(dtype, num_splits):
    out, ref, _ = run(H=4, Hkv=2, D=12, dtype=dtype, window=9, num_splits=num_splits, seed=4)
    torch.testing.assert_close(out.float(), ref.float(), **LOW_TOL[dtype])


def test_decode_only_batch():
    specs = [(1 + 7 * i % 40, 1) for i in range(12)]
    out, ref, meta = run(specs, block_size=4, H=8, Hkv=2, D=8, seed=5)
    assert meta.is_decode_only
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("H,Hkv", [(32, 1), (12, 4)])
def test_wide_and_odd_gqa_groups(H, Hkv):
    """G = 32 needs a 32-row tile of one token; G = 3 leaves padding rows in every tile."""
    out, ref, _ = run([(9, 1), (12, 5), (6, 6)], block_size=4, H=H, Hkv=Hkv, D=8, seed=6)
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_non_contiguous_q_from_fused_qkv():
    """Models slice q out of a fused qkv projection: a token stride wider than H * D."""
    meta, kv = make_batch(MIXED, 4, 2, 8, seed=7)
    qkv = torch.randn(meta.num_tokens, 4 + 2 * 2, 8, device=DEVICE)
    q = qkv[:, :4]
    assert not q.is_contiguous()
    out = pa.paged_attention(q, kv, meta, 0.4)
    torch.testing.assert_close(out, torch_ops.paged_attention(q.contiguous(), kv, meta, 0.4), **FP32_TOL)


def test_layers_reuse_tile_table_without_reading_device_tensors():
    meta, kv = make_batch(MIXED, 4, 2, 8, seed=8)

    def no_sync(*args, **kwargs):
        raise AssertionError("tile planning read a device tensor back")

    meta.query_start.tolist = no_sync  # the host lists must be used instead
    meta.context_lens.tolist = no_sync
    q = torch.randn(meta.num_tokens, 4, 8, device=DEVICE)
    outs = [pa.paged_attention(q, kv, meta, 0.3, window) for window in (None, 6)]  # two "layers"
    tile_keys = [k for k in meta.step_cache if k[0] == "triton_paged_attention_tiles"]
    assert len(tile_keys) == 1  # built once, reused by the second layer
    table, num_tiles = meta.step_cache[tile_keys[0]]
    block_q = tile_keys[0][1]
    # every query of every sequence is covered by exactly one tile
    covered = sorted((s, q_off + i) for s, q_off in table.tolist() for i in range(block_q)
                     if q_off + i < meta.query_start_host[s + 1] - meta.query_start_host[s])
    expected = [(s, i) for s in range(meta.num_seqs)
                for i in range(meta.query_start_host[s + 1] - meta.query_start_host[s])]
    assert table.dtype == torch.int32 and num_tiles == table.shape[0] and covered == expected
    for out, window in zip(outs, (None, 6)):
        torch.testing.assert_close(out, torch_ops.paged_attention(q, kv, meta, 0.3, window), **FP32_TOL)


# ---- host-side planning -------------------------------------------------------------------------
def test_choose_num_splits():
    assert pa.choose_num_splits(8, 8192, 64, sm_count=132) == 16  # few units, long context: split (capped)
    assert pa.choose_num_splits(64, 8192, 64, sm_count=132) == 5  # ~2 programs per SM
    assert pa.choose_num_splits(4, 600, 64, sm_count=132) == 2  # each partition keeps >= 4 key tiles
    assert pa.choose_num_splits(4, 200, 64, sm_count=132) == 1  # short contexts: no split
    assert pa.choose_num_splits(132, 8192, 64, sm_count=132) == 1  # the GPU is already full


@pytest.mark.parametrize("interpret", [True, False])
def test_pick_block_sizes(monkeypatch, interpret):
    monkeypatch.setattr(pa, "_interpreting", lambda: interpret)
    for G in (1, 2, 3, 4, 8, 32):
        for max_q in (1, 7, 512):
            cfg = pa.pick_block_sizes(G, 128, max_q, torch.bfloat16)
            m, n = cfg["BLOCK_M"], cfg["BLOCK_N"]
            assert m >= max(16, G) and m & (m - 1) == 0 and n >= 16 and n & (n - 1) == 0
    if not interpret:  # decodes get the smallest tile, long chunks the big one
        assert pa.pick_block_sizes(4, 128, 1, torch.bfloat16)["BLOCK_M"] == 16
        assert pa.pick_block_sizes(4, 128, 512, torch.bfloat16)["BLOCK_M"] == 64


def test_rejects_bad_inputs():
    meta, kv = make_batch([(5, 5)], 4, 2, 8)
    q = torch.randn(5, 4, 8, device=DEVICE)
    with pytest.raises(ValueError):
        pa.paged_attention(torch.randn(5, 4, 12, device=DEVICE), kv, meta, 1.0)  # head size mismatch
    with pytest.raises(ValueError):
        pa.paged_attention(torch.randn(5, 3, 8, device=DEVICE), kv, meta, 1.0)  # H % Hkv != 0
    with pytest.raises(ValueError):
        pa.paged_attention(q, kv[:, :, :2], meta, 1.0)  # block size differs from meta's
    with pytest.raises(ValueError):
        pa.paged_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kv, meta, 1.0)  # strided D
    with pytest.raises(TypeError):
        pa.paged_attention(q.double(), kv, meta, 1.0)
