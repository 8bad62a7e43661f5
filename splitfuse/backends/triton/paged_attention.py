"""Ragged paged attention in Triton: every sequence of a Dynamic SplitFuse step in one launch.

Semantics are those of `splitfuse.backends.torch_ops.paged_attention` (the reference): q [T, H, D]
holds the new tokens of S sequences laid end to end (meta.query_start); their K/V are already in
the paged cache kv_layer [2, num_blocks, block_size, Hkv, D]. A query at position p of its sequence
sees the cached keys at positions j <= p (and p - j < window with a sliding window). Prompt chunks
(many queries, causal inside the chunk, attending to every earlier cached token) and decodes (one
query) share the launch.

Design (FlashAttention-2 forward over a paged, ragged KV):
  * Work unit = (query tile, kv head [, KV partition]). A query tile is BLOCK_Q consecutive new
    tokens of one sequence times the G = H / Hkv query heads that share one kv head, flattened into
    BLOCK_M = BLOCK_Q * G rows (row r = token r // G, head r % G). Folding GQA into M means a decode
    with G heads still fills a tensor-core tile, and every K/V tile loaded is used by all G heads.
  * The (sequence, first query) of each tile comes from a small int32 table built on the host from
    meta.query_start_host once per step (no device->host sync) and cached in meta.step_cache, so all
    layers of the step reuse it.
  * Keys are read in tiles of BLOCK_N positions; each position is mapped to its slot through the
    block table (block = table[j // block_size], offset j % block_size), so any block size works.
    The loop runs only over the tile's visible key range [lo, hi) (causal end, sliding-window
    start); the mask handles the ragged edges. Online softmax in fp32 in the log2 domain.
  * Split-KV ("flash decoding"): when the step has too few work units to fill the GPU and contexts
    are long, each unit's key range is cut into `num_splits` partitions handled by separate
    programs that write partial (max, sum, unnormalised acc) to an fp32 workspace; a second small
    kernel merges them. Partitions can be empty (short sequences): they write max = -inf, sum 0.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from splitfuse.backends.triton.common import check_device, interpreting as _interpreting

__all__ = ["paged_attention", "choose_num_splits", "pick_block_sizes"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 16


# ---- kernels ------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # tanh from exp2 (libdevice is unavailable in the interpreter); saturates cleanly to +-1 since
    # exp2 overflows to inf (-> 1) or underflows to 0 (-> -1). Absolute error ~1e-7 near 0.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton 3.6's interpreter multiplies bf16 operands as their raw uint16 bits, so under
    # it bf16 tiles go through an fp32 dot instead: bf16 products are exact in fp32, so the result
    # is the one the tensor cores give. Never set on the GPU.
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision=PRECISION)
    return r


@triton.jit
def _paged_attention_kernel(
    Q, KV, Out,  # q [T, H, D]; kv [2, num_blocks, block_size, Hkv, D]; out [T, H, D]
    PartM, PartL, PartAcc,  # split-KV workspace: m, l [splits, T, H] and acc [splits, T, H, D_PAD] fp32
    Tiles,  # [num_tiles, 2] int32: (sequence, first query of the tile within the sequence's chunk)
    QueryStart, ContextLens, BlockTables,  # [S+1], [S], [S, max_blocks] int32
    scale, softcap, window, num_splits, num_tokens, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv_kv, stride_kv_block, stride_kv_tok, stride_kv_head,
    stride_bt,
    G: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,  # D and the next power of two (>= 16)
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = tl.load(Tiles + 2 * tile)
    q_off = tl.load(Tiles + 2 * tile + 1)
    q_begin = tl.load(QueryStart + seq)
    q_len = tl.load(QueryStart + seq + 1) - q_begin
    ctx_len = tl.load(ContextLens + seq)
    first_pos = ctx_len - q_len  # the new tokens are the last q_len positions of the context

    # rows: BLOCK_Q query tokens x G heads; rows past BLOCK_Q * G exist when G is no power of two
    rows = tl.arange(0, BLOCK_M)
    row_q = q_off + rows // G  # query index within this sequence's chunk
    row_head = kv_head * G + rows % G
    row_valid = (rows < BLOCK_Q * G) & (row_q < q_len)
    row_pos = first_pos + row_q  # [BLOCK_M] position of each row's query in its sequence
    row_tok = (q_begin + row_q).to(tl.int64)  # token index in the ragged batch

    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    q = tl.load(Q + row_tok[:, None] * stride_qt + row_head[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    kv_elt = KV.dtype.element_ty
    q = q.to(kv_elt)

    # Keys any row of this tile can see: [kv_lo, kv_hi). Tiles outside it are never visited.
    tile_last_q = tl.minimum(q_off + BLOCK_Q, q_len) - 1
    kv_hi = first_pos + tile_last_q + 1
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(first_pos + q_off - window + 1, 0)
    if SPLIT:
        # contiguous partitions of whole BLOCK_N tiles; trailing ones may be empty
        per_split = tl.cdiv(tl.cdiv(kv_hi - kv_lo, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = kv_lo + split * per_split
        kv_hi = tl.minimum(kv_hi, kv_lo + per_split)

    if HAS_SOFTCAP:
        qk_scale = scale
    else:
        qk_scale = scale * 1.4426950408889634  # fold log2(e) in: exp2 below
    table_row = BlockTables + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_kv_head

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        k_valid = kpos < kv_hi  # also keeps the block-table read inside this sequence's blocks
        block = tl.load(table_row + kpos // BLOCK_SIZE, mask=k_valid, other=0)
        # int64: block * stride overflows int32 on caches over 2**31 elements
        slot = block.to(tl.int64) * stride_kv_block + (kpos % BLOCK_SIZE) * stride_kv_tok + kv_head_off
        kv_off = slot[:, None] + d[None, :]  # [BLOCK_N, D_PAD]
        kv_mask = k_valid[:, None] & d_mask[None, :]
        k = tl.load(KV + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(KV + stride_kv_kv + kv_off, mask=kv_mask, other=0.0)

        s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
        if HAS_SOFTCAP:
            # softcap after scaling, before masking (as HF Gemma2), then into the log2 domain
            s = softcap * _tanh(s / softcap) * 1.4426950408889634
        visible = (kpos[None, :] <= row_pos[:, None]) & k_valid[None, :]
        if HAS_WINDOW:
            visible = visible & (row_pos[:, None] - kpos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row may see no key of this tile (window start, causal end, padding rows): subtract 0
        # instead of -inf there so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(kv_elt), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    out_mask = row_valid[:, None] & d_mask[None, :]
    if SPLIT:
        # partial results, row-indexed by (split, token, head); empty partitions store -inf / 0
        part_row = (split * num_tokens + row_tok) * num_heads + row_head  # int64
        tl.store(PartM + part_row, m_i, mask=row_valid)
        tl.store(PartL + part_row, l_i, mask=row_valid)
        tl.store(PartAcc + part_row[:, None] * D_PAD + d[None, :], acc,
                 mask=row_valid[:, None] & (d[None, :] < D_PAD))
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(Out + row_tok[:, None] * stride_ot + row_head[:, None] * stride_oh + d[None, :],
                 out.to(Out.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(
    PartM, PartL, PartAcc,  # [splits, T, H], [splits, T, H], [splits, T, H, D_PAD] fp32
    Out, num_splits, num_tokens, stride_ot, stride_oh,
    H: tl.constexpr, H_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    """One program per token: combine the partitions of all its heads (log-sum-exp merge)."""
    tok = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    h_mask = h < H
    row = tok * H + h  # [H_PAD] row of split 0
    split_rows = num_tokens * H  # rows per split

    m_max = tl.full([H_PAD], float("-inf"), tl.float32)
    for s in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(PartM + s * split_rows + row, mask=h_mask, other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)

    l_sum = tl.zeros([H_PAD], tl.float32)
    acc = tl.zeros([H_PAD, D_PAD], tl.float32)
    for s in range(num_splits):
        r = s * split_rows + row
        w = tl.exp2(tl.load(PartM + r, mask=h_mask, other=float("-inf")) - m_safe)  # 0 for empty partitions
        l_sum += w * tl.load(PartL + r, mask=h_mask, other=0.0)
        part = tl.load(PartAcc + r[:, None] * D_PAD + d[None, :], mask=h_mask[:, None], other=0.0)
        acc += w[:, None] * part
    out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
    tl.store(Out + tok * stride_ot + h[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
             mask=h_mask[:, None] & (d[None, :] < HEAD_DIM))


# ---- host side ----------------------------------------------------------------------------------
def pick_block_sizes(num_queries_per_kv: int, head_dim_padded: int, max_query_len: int,
                     dtype: torch.dtype) -> dict:
    """BLOCK_M (query rows = tokens x G heads), BLOCK_N (keys per tile), warps and stages.

    Under the interpreter every program costs milliseconds, so tiles stay at the 16 minimum that
    tl.dot needs. On the GPU a decode-only step needs only G rows (smallest tile: less wasted MMA
    and registers), prompt chunks get 64 rows; wide heads and fp32 (no tensor-core-sized data,
    twice the shared memory) use narrower key tiles.
    """
    G = num_queries_per_kv
    min_m = max(16, triton.next_power_of_2(G))
    if _interpreting():
        return dict(BLOCK_M=min_m, BLOCK_N=16, num_warps=4, num_stages=1)
    rows = max_query_len * G
    block_m = max(min_m, min(64, triton.next_power_of_2(rows)))
    block_n = 64 if head_dim_padded <= 128 else 32
    if dtype == torch.float32:
        block_n = min(block_n, 32)
    num_warps = 8 if block_m * head_dim_padded >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=2)


def choose_num_splits(num_work_units: int, max_context_len: int, block_n: int, sm_count: int) -> int:
    """KV partitions per work unit for split-KV, from host-side sizes only.

    Split only when the (tile, kv head) units cannot fill the GPU (fewer than one per SM) and the
    longest context is long enough that each partition keeps >= 4 key tiles to amortise its
    partial-result write; aim for about two programs per SM.
    """
    if num_work_units <= 0 or num_work_units >= sm_count:
        return 1
    by_occupancy = math.ceil(2 * sm_count / num_work_units)
    by_length = max_context_len // (4 * block_n)
    return max(1, min(by_occupancy, by_length, _MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_table(meta, block_q: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """[num_tiles, 2] int32 (sequence, first query in its chunk) for tiles of block_q queries.

    Built once per step from host lists and cached in meta.step_cache: every layer reuses it and
    no device->host sync happens (the .tolist() fallback is only for metadata built without host
    lists). Tiles are ordered by descending key range (longest work first) so the tail of the
    launch is made of short programs.
    """
    key = ("triton_paged_attention_tiles", block_q, str(device))
    cached = meta.step_cache.get(key)
    if cached is not None:
        return cached
    starts = meta.query_start_host or meta.query_start.tolist()
    ctx_lens = meta.context_lens_host or meta.context_lens.tolist()
    tiles = []  # (keys seen by the tile's last query, seq, q_off)
    for s in range(meta.num_seqs):
        q_len = starts[s + 1] - starts[s]
        for q_off in range(0, q_len, block_q):
            last = min(q_off + block_q, q_len)
            tiles.append((ctx_lens[s] - q_len + last, s, q_off))
    tiles.sort(key=lambda t: -t[0])  # stable: equal work keeps batch order
    table = torch.tensor([[s, q] for _, s, q in tiles], dtype=torch.int32).reshape(-1, 2)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    else:
        table = table.to(device)
    cached = meta.step_cache[key] = (table, len(tiles))
    return cached


def _split_workspace(meta, num_splits: int, T: int, H: int, d_pad: int, device: torch.device):
    """fp32 partial results (m, l, acc) for split-KV, allocated once per step and reused by layers
    (layers run one after another on one stream, so they never overlap)."""
    key = ("triton_paged_attention_splits", num_splits, T, H, d_pad, str(device))
    ws = meta.step_cache.get(key)
    if ws is None:
        m = torch.empty(num_splits, T, H, dtype=torch.float32, device=device)
        l = torch.empty_like(m)
        acc = torch.empty(num_splits, T, H, d_pad, dtype=torch.float32, device=device)
        ws = meta.step_cache[key] = (m, l, acc)
    return ws


def paged_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta, scale: float,
    sliding_window: int | None = None, logit_softcap: float | None = None, *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of ragged q [T, H, D] over each sequence's paged K/V; returns [T, H, D]
    in q.dtype. The K/V of this step's tokens must already be in kv_layer.

    num_splits: KV partitions per work unit (split-KV); None picks from the step's sizes (1, no
    split, off the GPU), an int forces it (tests use it to exercise the merge kernel).
    """
    op = "paged_attention"
    if q.dim() != 3 or kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(f"{op}: expected q [T, H, D] and kv_layer [2, blocks, block_size, Hkv, D], got "
                         f"{tuple(q.shape)} and {tuple(kv_layer.shape)}")
    T, H, D = q.shape
    _, _, block_size, Hkv, Dkv = kv_layer.shape
    if Dkv != D or H % Hkv != 0:
        raise ValueError(f"{op}: q {tuple(q.shape)} does not match kv_layer {tuple(kv_layer.shape)}: "
                         "same D, H % Hkv == 0")
    if block_size != meta.block_size:
        raise ValueError(f"{op}: kv_layer block size {block_size} != meta.block_size {meta.block_size}")
    if q.dtype not in _DTYPES or kv_layer.dtype not in _DTYPES:
        raise TypeError(f"{op}: q and kv_layer must be float16, bfloat16 or float32, got {q.dtype} and {kv_layer.dtype}")
    if q.stride(-1) != 1 or kv_layer.stride(-1) != 1:
        raise ValueError(f"{op}: q and kv_layer need a contiguous last (head) dimension")
    check_device(op, q.device, kv_layer=kv_layer, query_start=meta.query_start, context_lens=meta.context_lens,
                 block_tables=meta.block_tables)
    for name in ("query_start", "context_lens", "block_tables"):
        t = getattr(meta, name)
        if t.dtype != torch.int32 or t.stride(-1) != 1:
            raise ValueError(f"{op}: meta.{name} must be int32 with a contiguous last dimension")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{op}: sliding_window must be >= 1, got {sliding_window}")
    if num_splits is not None and not 1 <= num_splits <= 1024:
        raise ValueError(f"{op}: num_splits must be in [1, 1024], got {num_splits}")

    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return out

    G = H // Hkv
    d_pad = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16
    cfg = pick_block_sizes(G, d_pad, meta.max_query_len, kv_layer.dtype)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_q = block_m // G  # >= 1: BLOCK_M >= next_pow2(G)
    tiles, num_tiles = _tile_table(meta, block_q, q.device)

    if num_splits is None:
        num_splits = 1
        if q.is_cuda and not _interpreting():
            sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
            num_splits = choose_num_splits(num_tiles * Hkv, meta.max_context_len, block_n, sms)
    split = num_splits > 1
    if split:
        part_m, part_l, part_acc = _split_workspace(meta, num_splits, T, H, d_pad, q.device)
    else:
        part_m = part_l = part_acc = out  # unused (SPLIT is a constexpr False)

    bt = meta.block_tables
    _paged_attention_kernel[(num_tiles, Hkv, num_splits)](
        q, kv_layer, out, part_m, part_l, part_acc,
        tiles, meta.query_start, meta.context_lens, bt,
        float(scale), float(logit_softcap or 1.0), int(sliding_window or 0), num_splits, T, H,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        bt.stride(0),
        G=G, HEAD_DIM=D, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=logit_softcap is not None, SPLIT=split,
        # fp32 must not silently drop to TF32 on tensor cores: the fp32 path is the accuracy path
        DOT_PRECISION="ieee" if kv_layer.dtype == torch.float32 else "tf32",
        DOT_UPCAST=kv_layer.dtype == torch.bfloat16 and _interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split:
        _merge_splits_kernel[(T,)](
            part_m, part_l, part_acc, out, num_splits, T, out.stride(0), out.stride(1),
            H=H, H_PAD=triton.next_power_of_2(H), HEAD_DIM=D, D_PAD=d_pad,
            num_warps=4 if H * d_pad >= 2048 else 1,
        )
    return out
