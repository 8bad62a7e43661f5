"""Token sampling for a whole batch on the device: greedy, temperature, top-k, top-p, per-row seeds.

One step's S' rows are sampled with no host sync and no Python loop over rows or vocabulary:

1. suppression (EOS / stop ids before min_new_tokens): one scatter of -inf from a padded
   [S', M] id tensor (-1 = padding) into a copy of the logits;
2. top-k / top-p thresholds: one ascending torch.sort of the rows that filter (in row chunks,
   to bound the sort's scratch memory), then per row the *raw logit* of the least likely kept
   token. Keeping "every token whose logit >= threshold" is the whole filter, so the kernel
   needs one float per row and no sorted copy;
3. one Triton launch, one pass over V in tiles: the kept set, counter-based noise and a running
   argmax. A program owns one row for real vocabularies (a 128K row streams through one SM; the
   batch's rows fill the others), several rows when V is small.

The draw is the exponential race (Gumbel-max in log space): token = argmax over kept tokens of
logit / T - log(E) with E ~ Exp(1) independent per token, which picks token i with probability
softmax(logit / T) restricted to the kept set. No softmax, max or cumsum pass is needed.

Randomness is counter-based (splitfuse/core/philox.py computes the same numbers for the cpu
sampler: change the two together): E for (row, token) comes from Philox keyed by the row's 64-bit
seed with counter offset * V + token (`tl.randint(seed, offset * V + token)`), where offset is
the row's own draw counter (how many tokens that request has drawn so far). A request thus gets
the same noise whatever batch it shares and whatever row it sits in, and a fresh stream each
step. Greedy rows (temperature 0 or top_k 1) ignore noise and thresholds: argmax, ties to the
lowest index as torch.argmax.

Filtering follows splitfuse.core.sampler._filtered_probs (HF's rules):
- top-k: keep tokens whose scaled logit >= the k-th largest. Ties at the k-th value are ALL kept
  (as the reference's `scaled < kth` masking does), so more than k tokens may survive.
- top-p: on the top-k-filtered softmax, sorted ascending, drop tokens whose cumulative mass is
  <= 1 - top_p (the least likely token that survives is never dropped): the smallest set of
  most likely tokens whose mass reaches top_p. Ties at the cutoff value are all kept here, where
  the reference keeps whichever of the tied tokens its sort put last (it may drop some of them).
  Up to float rounding at the cutoff (mass summed in another order) the kept sets are the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Sort scratch per row chunk: torch.sort's values + int64 indices, the scaled copy, the softmax,
# the cumsum and masks are ~30 bytes per element; 8M elements keeps a chunk near 250 MB
# (64 rows of a 128K vocabulary) inside the backend's fixed activation reserve.
_SORT_CHUNK_ELEMENTS = 1 << 23


@triton.jit
def _sample_kernel(
    logits_ptr, stride_row, temps_ptr, top_ks_ptr, thr_ptr, seeds_ptr, offsets_ptr, out_ptr, S, V,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # BLOCK_R rows per program (1 on the GPU for real vocabularies; many for small ones and under
    # the interpreter, whose cost is per program step rather than per element)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < S
    t = tl.load(temps_ptr + rows, mask=row_ok, other=0.0)
    k = tl.load(top_ks_ptr + rows, mask=row_ok, other=1)
    greedy = (t <= 0.0) | (k == 1)
    inv_t = 1.0 / tl.where(greedy, 1.0, t)  # greedy rows never use it; 1.0 keeps it finite
    thr = tl.load(thr_ptr + rows, mask=row_ok, other=0.0)
    seed = tl.load(seeds_ptr + rows, mask=row_ok, other=0)
    # counter base of each row's draw: offset * V + token is unique per (draw, token) of a seed
    base = tl.load(offsets_ptr + rows, mask=row_ok, other=0).to(tl.int64) * V
    row_ptrs = logits_ptr + rows.to(tl.int64) * stride_row

    # per-lane running argmax; a lane only ever sees increasing token ids, so a strict `>` keeps
    # the lowest id among equal keys within a lane, and the final reduction the lowest overall
    best_key = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_R, BLOCK_V], tl.int32) + V  # V = "nothing yet"
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=in_row, other=float("-inf")).to(tl.float32)

        # Uniform u in (0, 1) from the top 31 bits, +2^-32 so u > 0: exactly representable for
        # small u, which are the ones that matter (E = -log(1 - u) small, the token likely to
        # win). -log(1 - u) loses all precision there in float32 (1 - u rounds to 1), so small u
        # take the series u + u^2 / 2 (relative error < u^2 / 3 < 4e-7). Near u = 1, where u
        # rounds to 1.0, E is clamped at -log(2^-26) ~ 18: such tokens lose anyway.
        r = tl.randint(seed[:, None], base[:, None] + cols[None, :])
        u = (r >> 1).to(tl.float32) * 4.656612873077393e-10 + 2.3283064365386963e-10
        e = tl.where(u < 1.0e-3, u * (1.0 + 0.5 * u), -tl.log(tl.maximum(1.0 - u, 1.4901161193847656e-08)))
        noisy = x * inv_t[:, None] - tl.log(e)
        kept = in_row & (x >= thr[:, None]) & (x > float("-inf"))  # -inf: suppressed (and never NaN)
        # a kept token always beats a dropped one, even if its key underflowed to -inf
        sampled_key = tl.where(kept, tl.maximum(noisy, -3.4e38), float("-inf"))
        key = tl.where(greedy[:, None], x, sampled_key)

        better = key > best_key
        best_key = tl.where(better, key, best_key)
        best_idx = tl.where(better, cols[None, :], best_idx)

    top = tl.max(best_key, axis=1)
    idx = tl.min(tl.where(best_key == top[:, None], best_idx, V), axis=1)
    idx = tl.where(idx >= V, 0, idx)  # every key -inf (all suppressed): token 0, like torch.argmax
    tl.store(out_ptr + rows, idx.to(tl.int64), mask=row_ok)


def suppress(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Copy of logits [S', V] with -inf at ids [S', M] (per row; -1 and ids >= V are padding).

    The copy is one column wider and padding points at that spare column, so every scattered
    value is -inf and duplicate indices cannot race. Returns a [S', V] view (row stride V + 1)."""
    S, V = logits.shape
    if ids.dim() != 2 or ids.shape[0] != S or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"suppressed ids: expected an int tensor [{S}, M], got {ids.dtype} {tuple(ids.shape)}")
    if ids.device != logits.device:
        raise ValueError(f"suppressed ids are on {ids.device}, logits on {logits.device}")
    buf = logits.new_empty(S, V + 1)
    buf[:, :V].copy_(logits)
    ids = ids.long()
    buf.scatter_(1, torch.where((ids >= 0) & (ids < V), ids, V), float("-inf"))
    return buf[:, :V]


def filter_thresholds(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row raw-logit thresholds [S'] float32: the kept set of a row is {logit >= threshold}.

    rows (int64 ids on the logits' device) limits the sort to the rows that filter; the others get
    -inf (keep everything). None sorts every row. Device ops only, no host sync."""
    S, V = logits.shape
    thr = torch.full((S,), float("-inf"), dtype=torch.float32, device=logits.device)
    if rows is None:
        rows = torch.arange(S, device=logits.device)
    n = rows.numel()  # a shape: known on the host without a sync
    chunk = max(1, _SORT_CHUNK_ELEMENTS // max(V, 1))
    for lo in range(0, n, chunk):
        sel = rows[lo:lo + chunk]
        thr.index_copy_(0, sel, _thresholds(logits.index_select(0, sel), temperatures.index_select(0, sel),
                                            top_ks.index_select(0, sel), top_ps.index_select(0, sel)))
    return thr


def _thresholds(x: torch.Tensor, t: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x [R, V] logits of rows that filter -> [R] thresholds (mirrors sampler._filtered_probs)."""
    R, V = x.shape
    sorted_x = torch.sort(x, dim=-1).values  # ascending, as the reference's top-p sort
    t = torch.where(t > 0, t, torch.ones_like(t))  # greedy rows' thresholds are unused
    # the same float32 division as the reference: x / T is monotone, so sorting raw logits sorts
    # the scaled ones, and equal scaled values (the tie rules) are compared as the reference does
    scaled = sorted_x / t[:, None]
    k = k.long()
    kth = scaled.gather(1, (V - k).clamp(0, V - 1)[:, None])  # k-th largest, ascending position V - k
    kth = torch.where(((k > 0) & (k < V))[:, None], kth, float("-inf"))
    scaled.masked_fill_(scaled < kth, float("-inf"))  # top-k; ties at kth stay
    cumulative = scaled.softmax(-1).cumsum_(-1)
    drop = (cumulative <= (1 - p)[:, None]) & (p < 1)[:, None]  # top-p (HF's rule)
    drop |= scaled == float("-inf")  # top-k's drops (and suppressed ids)
    drop[:, -1] = False  # at least one token
    # each drop rule removes a prefix of the ascending order, so the union is a prefix too and
    # its length is the position of the least likely kept token
    first_kept = drop.sum(-1).clamp_(max=V - 1)
    return sorted_x.gather(1, first_kept[:, None]).squeeze(1).float()


def _check_row_tensor(name: str, t: torch.Tensor, S: int, device: torch.device, floating: bool) -> torch.Tensor:
    if t.dim() != 1 or t.shape[0] != S:
        raise ValueError(f"sample: {name} must be 1-D with one entry per row ({S}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"sample: {name} is on {t.device}, logits on {device}")
    if floating != t.is_floating_point() or t.dtype == torch.bool:
        kind = "floating-point" if floating else "integer"
        raise TypeError(f"sample: {name} must be a {kind} tensor, got {t.dtype}")
    return t.contiguous()


def sample(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
    seeds: torch.Tensor, offsets: torch.Tensor, *, suppressed: torch.Tensor | None = None,
    filter_rows: torch.Tensor | None = None, block_size: int | None = None,
) -> torch.Tensor:
    """Next token per row: logits [S', V] float32 -> tokens [S'] int64, without a host sync.

    Per-row tensors [S'] on the logits' device: temperatures (float; <= 0 greedy), top_ks (int;
    0 or >= V off, 1 greedy), top_ps (float; >= 1 off), seeds (int64; any 64-bit pattern), offsets
    (int64 draw counters: same (seed, offset) -> same noise). suppressed: optional int [S', M] ids
    to mask to -inf first (-1 padding). filter_rows: optional int64 ids of the rows with top-k or
    top-p on (the caller usually knows them from host-side settings); None sorts every row.
    block_size: vocabulary tile (a power of 2), for tests.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [S', V], got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise TypeError(f"sample: logits must be float32, got {logits.dtype}")
    S, V = logits.shape
    device = logits.device
    temperatures = _check_row_tensor("temperatures", temperatures, S, device, True).float()
    top_ks = _check_row_tensor("top_ks", top_ks, S, device, False)
    top_ps = _check_row_tensor("top_ps", top_ps, S, device, True).float()
    seeds = _check_row_tensor("seeds", seeds, S, device, False).long()
    offsets = _check_row_tensor("offsets", offsets, S, device, False).long()
    if filter_rows is not None:
        if filter_rows.dim() != 1 or filter_rows.device != device or filter_rows.is_floating_point():
            raise ValueError("sample: filter_rows must be a 1-D integer tensor on the logits' device")
        filter_rows = filter_rows.long()
    out = torch.empty(S, dtype=torch.int64, device=device)
    if S == 0:
        return out
    if V == 0:
        raise ValueError("sample: empty vocabulary")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if suppressed is not None and suppressed.numel():
        logits = suppress(logits, suppressed)
    thr = filter_thresholds(logits, temperatures, top_ks, top_ps, filter_rows)

    if block_size is None:
        # GPU: 4K-element tiles (16 floats per thread at 8 warps), each row streamed once; the
        # interpreter: one tile per row where possible (fewer, larger steps)
        block_size = min(triton.next_power_of_2(V), 4096 if device.type == "cuda" else 8192)
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"sample: block_size must be a power of 2, got {block_size}")
    # rows per program: fill a tile of ~4K (GPU) / 64K (interpreter) elements when V is small
    tile = 4096 if device.type == "cuda" else 65536
    block_r = max(1, min(triton.next_power_of_2(S), tile // block_size))
    num_warps = 8 if device.type == "cuda" and block_r * block_size >= 2048 else 4
    _sample_kernel[(triton.cdiv(S, block_r),)](
        logits, logits.stride(0), temperatures, top_ks, thr, seeds, offsets, out, S, V,
        BLOCK_R=block_r, BLOCK_V=block_size, num_warps=num_warps,
    )
    return out


__all__ = ["filter_thresholds", "sample", "suppress"]
