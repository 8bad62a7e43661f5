"""Reference ops in plain torch: the default of every Backend op and the CPU backend's speed path.

Pure functions, no device-specific API: they run wherever their tensors live. Numerics follow
Hugging Face transformers' eager implementations so fp32 outputs can be compared token for token.
Shapes: T tokens of one ragged batch, S sequences, H query heads, Hkv key/value heads, D head size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

# the rotary tables live with the models; re-exported because backends and their tests build them here
from splitfuse.models.rope import build_cos_sin_cache as build_cos_sin_cache
from splitfuse.quant.weights import QuantizedWeight

if TYPE_CHECKING:
    from splitfuse.core.batch import BatchMeta

# Elements (float32) one attention group may hold at once: its scores plus its gathered K and V.
# Big enough that a step's decodes run as one batched matmul, small enough to keep long prompt
# chunks and huge batches from allocating gigabytes.
_GROUP_BUDGET = 1 << 25


# ---- KV cache -----------------------------------------------------------------------------------
def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hkv, D] into kv_layer [2, num_blocks, block_size, Hkv, D] at slot_mapping [T]."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_layer.shape
    # view (not reshape) so a non-contiguous cache fails loudly instead of writing into a copy
    slots = kv_layer.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    slots[0].index_copy_(0, slot_mapping, k.to(kv_layer.dtype))
    slots[1].index_copy_(0, slot_mapping, v.to(kv_layer.dtype))


# ---- attention ----------------------------------------------------------------------------------
# Each step is planned once (cached in meta.step_cache, reused by every layer) as:
#   * decodes (one query each), batched: their keys are gathered head-major and padded to the
#     longest, [B*Hkv, L, D], so that the scores are ONE batched matmul with the G query heads of
#     a kv head as its rows, [B*Hkv, G, D] @ [B*Hkv, D, L], padding hidden by an additive mask;
#   * prompt chunks (several queries), one SDPA call each over their keys [Hkv, L, D]; a chunk
#     that starts its sequence sees exactly its own tokens, so is_causal replaces the mask.
# The indices come from vectorised torch ops over the block tables, not per-token Python loops.
# On the CPU gathering K/V from the cache costs more than the matmuls (the cache is cold by the
# time a layer comes round again), so the gathers are laid out to be read once, right away.
class _Decodes:
    """B single-query sequences (tokens `tokens`) whose keys are padded to the longest, L."""

    def __init__(self, tokens: list[int], lo: list[int], num_keys: list[int], pos_rows: torch.Tensor,
                 heads: torch.Tensor):
        device = pos_rows.device
        self.B, self.L = len(tokens), max(num_keys)
        # consecutive tokens (always, in a decode-only step): queries and outputs are slices of q
        # and out, no gather and no scatter
        self.first = tokens[0] if tokens == list(range(tokens[0], tokens[0] + self.B)) else None
        self.tokens = None if self.first is not None else torch.tensor(tokens, device=device)
        n = torch.tensor(num_keys, device=device)[:, None]
        j = torch.arange(self.L, device=device)
        # padding keys repeat the last real key (an allocated slot); the mask hides them
        pos = torch.minimum(j, n - 1)  # [B, L], relative to the first key
        if any(lo):
            pos += torch.tensor(lo, device=device)[:, None]
        self.rows = (pos_rows.gather(1, pos)[:, None, :] + heads).view(2, -1)  # [2, B*Hkv*L]: K, V rows
        # additive mask 0 / -inf per (sequence, kv head) row of the batched matmul: [B*Hkv, 1, L]
        mask = torch.where(j >= n, float("-inf"), 0.0)[:, None, None]  # [B, 1, 1, L]
        self.mask = mask.expand(-1, heads.shape[-2], -1, -1).reshape(-1, 1, self.L)


class _Chunk:
    """n queries of one sequence (tokens t0.., positions q0..) over its keys at positions lo..lo+L-1."""

    def __init__(self, t0: int, n: int, q0: int, lo: int, window: int | None, pos_rows: torch.Tensor,
                 heads: torch.Tensor):
        self.t0, self.n, self.q0, self.lo, self.L = t0, n, q0, lo, q0 + n - lo
        self.window = window
        # keys = the chunk's own tokens and no window cuts in: is_causal instead of a mask
        self.causal = q0 == 0 and (window is None or window >= n)
        self.rows = pos_rows[lo: lo + self.L] + heads  # [2, 1, Hkv, L]: K, V rows of its keys
        self._mask = None

    def mask(self, device) -> torch.Tensor:
        """[n, L] additive mask (0 / -inf): causal, plus the sliding window; built on first use."""
        if self._mask is None:
            q_pos = torch.arange(self.q0, self.q0 + self.n, device=device)[:, None]
            k_pos = torch.arange(self.lo, self.lo + self.L, device=device)[None, :]
            hidden = k_pos > q_pos
            if self.window is not None:
                hidden |= q_pos - k_pos >= self.window
            self._mask = torch.where(hidden, float("-inf"), 0.0)
        return self._mask


class _StepPlan:
    """Decode groups (each gathers its own K/V) and prompt-chunk pieces, whose K and V rows are
    concatenated, [2, R], so that a layer gathers all of them with one index_select each."""

    def __init__(self, decodes: list[_Decodes], chunks: list[_Chunk]):
        self.decodes, self.chunks = decodes, chunks
        row = 0
        for c in chunks:
            c.row0, row = row, row + c.rows[0].numel()
        parts = [c.rows.view(2, -1) for c in chunks]
        self.chunk_rows = None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _plan(meta: "BatchMeta", kv_shape, num_heads: int, window: int | None, device) -> _StepPlan:
    """Plan this step's attention; cached on meta since every layer reuses it."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_shape
    key = ("attention", num_heads, num_blocks, block_size, num_kv_heads, head_dim, window, str(device))
    cache = meta.step_cache
    if key in cache:
        return cache[key]
    starts = meta.query_start_host or meta.query_start.tolist()
    ctx_lens = meta.context_lens_host or meta.context_lens.tolist()
    # the cache is gathered as rows [2 * slots * Hkv, D]: pos_rows [S, blocks * block_size] is the
    # row of kv head 0's key at each position of each sequence; heads [2, 1, Hkv, 1] the offsets
    # from it to kv head h's key, and to its value (the values follow all keys)
    tables = meta.block_tables.to(device).long() * (block_size * num_kv_heads)
    pos_rows = tables[:, :, None] + torch.arange(0, block_size * num_kv_heads, num_kv_heads, device=device)
    pos_rows = pos_rows.view(len(tables), -1)
    v0 = num_blocks * block_size * num_kv_heads
    heads = torch.tensor([list(range(num_kv_heads)), list(range(v0, v0 + num_kv_heads))], device=device)
    heads = heads.view(2, 1, num_kv_heads, 1)
    decode_seqs, chunks = [], []
    for s in range(meta.num_seqs):
        t0, qlen = starts[s], starts[s + 1] - starts[s]
        if qlen == 1:
            decode_seqs.append(s)
            continue
        q0 = ctx_lens[s] - qlen  # new tokens are the last qlen of the context
        # long chunks are cut into query pieces whose scores fit half the budget (the softcap path
        # materialises them; SDPA does not, but its mask would)
        step = max(1, (_GROUP_BUDGET // 2) // (num_heads * max(ctx_lens[s], 1)))
        for a in range(0, qlen, step):
            n = min(step, qlen - a)
            lo = 0 if window is None else max(0, q0 + a - window + 1)
            chunks.append(_Chunk(t0 + a, n, q0 + a, lo, window, pos_rows[s], heads))
    decodes = []
    for group in _decode_groups(decode_seqs, ctx_lens, num_heads, num_kv_heads * head_dim, window):
        lo = [0 if window is None else max(0, ctx_lens[s] - window) for s in group]
        rows = pos_rows if group == list(range(len(pos_rows))) else pos_rows[torch.tensor(group, device=device)]
        decodes.append(_Decodes([starts[s] for s in group], lo, [ctx_lens[s] - a for s, a in zip(group, lo)],
                                rows, heads))
    plan = cache[key] = _StepPlan(decodes, chunks)
    return plan


def _decode_groups(seqs: list[int], ctx_lens: list[int], num_heads: int, kv_row: int, window: int | None):
    """Decodes in groups whose scores and gathered K/V fit the budget: all in one (in batch order,
    so the group's queries and outputs are slices) unless that is too big; then by key count.
    (Splitting a batch that fits into groups of similar lengths saves padding but measured slower.)"""
    def keys(s):
        return ctx_lens[s] if window is None else min(ctx_lens[s], window)

    def cost(n, length):
        return n * length * (num_heads + 2 * kv_row)

    if not seqs:
        return []
    if cost(len(seqs), max(map(keys, seqs))) <= _GROUP_BUDGET:
        return [seqs]
    groups, cur = [], []
    for s in sorted(seqs, key=keys):
        if cur and cost(len(cur) + 1, keys(s)) > _GROUP_BUDGET:
            groups.append(cur)
            cur = []
        cur.append(s)
    return groups + [cur]


def _workspace(meta: "BatchMeta", name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A scratch buffer owned by this step's meta, reused by every layer: one allocation per step
    instead of one per layer, and a buffer that stays in cache."""
    cache = meta.step_cache
    key = ("workspace", name, dtype, str(device))
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _gather(kv_layer: torch.Tensor, rows: torch.Tensor, meta: "BatchMeta", name: str) -> torch.Tensor:
    """Rows [R, D] (float32) of the cache viewed [2 * slots * Hkv, D], into a per-step workspace."""
    D = kv_layer.shape[-1]
    # view (not reshape) so a non-contiguous cache fails loudly instead of gathering from a copy
    out = _workspace(meta, name, rows.numel() * D, kv_layer.dtype, kv_layer.device).view(-1, D)
    torch.index_select(kv_layer.view(-1, D), 0, rows, out=out)
    if out.dtype != torch.float32:
        out = _workspace(meta, name + "32", out.numel(), torch.float32, out.device).view_as(out).copy_(out)
    return out


def _softcap_(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else scores.div_(cap).tanh_().mul_(cap)


def _decode_probs(q: torch.Tensor, k_rows: torch.Tensor, g: _Decodes, scale, softcap) -> torch.Tensor:
    """Softmax of the scores of one query per sequence: [B*Hkv, G, D] @ [B*Hkv, D, L] -> [B*Hkv, G, L]."""
    _, H, D = q.shape
    BH = g.mask.shape[0]  # B * Hkv
    k = k_rows.view(BH, g.L, D)
    qg = q[g.first: g.first + g.B] if g.first is not None else q.index_select(0, g.tokens)
    qg = qg.reshape(BH, H * g.B // BH, D)  # query head h = kv_head * G + i, so a kv head's G are adjacent
    # same order of operations as HF eager attention: q@k^T * scale, softcap, mask, fp32 softmax, @v
    if softcap is None:
        scores = torch.baddbmm(g.mask, qg, k.transpose(1, 2), alpha=scale)  # mask + scale * (q@k^T), exact
    else:
        scores = _softcap_(torch.bmm(qg, k.transpose(1, 2)).mul_(scale), softcap).add_(g.mask)
    return torch.softmax(scores, dim=-1)


def _decode_output(probs: torch.Tensor, v_rows: torch.Tensor, g: _Decodes, out: torch.Tensor) -> None:
    """probs [B*Hkv, G, L] @ V [B*Hkv, L, D], written to the decodes' rows of out [T, H, D]."""
    BH, G, L = probs.shape
    v = v_rows.view(BH, L, -1)
    if g.first is not None:
        torch.bmm(probs, v, out=out[g.first: g.first + g.B].view(BH, G, -1))
    else:
        out.index_copy_(0, g.tokens, torch.bmm(probs, v).view(g.B, -1, out.shape[-1]))


def _attend_chunk(q: torch.Tensor, k_rows, v_rows, c: _Chunk, out, scale, softcap) -> None:
    """The queries of one prompt chunk over its keys [Hkv, L, D]."""
    _, H, D = q.shape
    Hkv = c.rows.shape[2]
    k = k_rows[c.row0: c.row0 + Hkv * c.L].view(Hkv, c.L, D)
    v = v_rows[c.row0: c.row0 + Hkv * c.L].view(Hkv, c.L, D)
    qc = q[c.t0: c.t0 + c.n]  # [n, H, D]
    if softcap is None:
        mask = None if c.causal else c.mask(q.device)
        # 4-d [1, heads, tokens, D] views: SDPA's fused CPU kernel takes them, 3-d ones fall back to math
        o = F.scaled_dot_product_attention(
            qc.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, is_causal=c.causal, scale=scale,
            enable_gqa=True)
        out[c.t0: c.t0 + c.n].copy_(o[0].transpose(0, 1))
        return
    # SDPA has no softcap: HF eager's order of operations, query heads of one kv head as rows
    qg = qc.view(c.n, Hkv, H // Hkv, D).permute(1, 2, 0, 3).reshape(Hkv, -1, D)  # [Hkv, G*n, D]
    scores = _softcap_(torch.bmm(qg, k.transpose(1, 2)).mul_(scale), softcap)  # [Hkv, G*n, L]
    scores.view(Hkv, -1, c.n, c.L).add_(c.mask(q.device))
    o = torch.bmm(torch.softmax(scores, dim=-1), v).view(Hkv, -1, c.n, D)  # [Hkv, G, n, D]
    out[c.t0: c.t0 + c.n].view(c.n, Hkv, -1, D).copy_(o.permute(2, 0, 1, 3))


def paged_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: "BatchMeta", scale: float,
    sliding_window: int | None = None, logit_softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of ragged q [T, H, D] over each sequence's paged K/V; returns [T, H, D]."""
    T, H, D = q.shape
    out = torch.empty(T, H, D, dtype=torch.float32, device=q.device)
    if T == 0:
        return out.to(q.dtype)
    plan = _plan(meta, kv_layer.shape, H, sliding_window, q.device)
    q32 = q.float()
    # keys first, then (into the same buffer) values once the softmax is done: the buffer is read
    # right after it is written, and one buffer keeps the step's memory footprint in cache
    for g in plan.decodes:
        probs = _decode_probs(q32, _gather(kv_layer, g.rows[0], meta, "k"), g, scale, logit_softcap)
        _decode_output(probs, _gather(kv_layer, g.rows[1], meta, "k"), g, out)
    if plan.chunks:
        k_rows = _gather(kv_layer, plan.chunk_rows[0], meta, "k")
        v_rows = _gather(kv_layer, plan.chunk_rows[1], meta, "v")
        for c in plan.chunks:
            _attend_chunk(q32, k_rows, v_rows, c, out, scale, logit_softcap)
    return out.to(q.dtype)


# ---- rotary embeddings --------------------------------------------------------------------------
def _rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool,
                 out: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of x [T, heads, D] into out (same shape); cos, sin
    [T, 1, rotary_dim/2]. Writes the halves in place: no stack/cat copies."""
    partial = rotary_dim < x.shape[-1]
    rot, o = (x[..., :rotary_dim], out[..., :rotary_dim]) if partial else (x, out)
    if interleaved:  # GPT-J pairs (x[2i], x[2i+1])
        x1, x2, o1, o2 = rot[..., 0::2], rot[..., 1::2], o[..., 0::2], o[..., 1::2]
    else:  # neox halves, as HF rotate_half
        (x1, x2), (o1, o2) = rot.chunk(2, dim=-1), o.chunk(2, dim=-1)
    # same products and rounding as HF's q*cos + rotate_half(q)*sin: o1 = x1*cos - x2*sin, o2 = x2*cos + x1*sin
    tmp = x2 * sin
    torch.mul(x1, cos, out=o1).sub_(tmp)
    torch.mul(x1, sin, out=tmp)
    torch.mul(x2, cos, out=o2).add_(tmp)
    if partial:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    return out


def _joint_qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, H, D] and k [T, Hkv, D] as one [T, H + Hkv, D] view when k's heads directly follow q's
    in memory (the fused qkv projection's output split into q, k, v), else None."""
    T, H, D = q.shape
    if (q._base is None or k._base is not q._base or k.dtype != q.dtype or k.shape[0] != T or k.shape[2] != D
            or q.stride()[1:] != (D, 1) or k.stride() != (q.stride(0), D, 1)
            or k.data_ptr() != q.data_ptr() + H * D * q.element_size()):
        return None
    return q.as_strided((T, H + k.shape[1], D), (q.stride(0), D, 1))


def _new_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rotary_dim: int | None = None, interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [T, H, D] and k [T, Hkv, D] at positions [T]; returns new tensors
    (views of one [T, H + Hkv, D] buffer when q and k come from one fused projection)."""
    rotary_dim = rotary_dim or cos_sin.shape[-1]
    # HF casts cos/sin to the activation dtype and rotates in it
    cs = cos_sin.index_select(0, positions)
    cos, sin = (cs if cs.dtype == q.dtype else cs.to(q.dtype))[:, None].chunk(2, dim=-1)  # [T, 1, rotary_dim/2]
    qk = _joint_qk(q, k)
    if qk is not None:  # one pass over both
        out = _rotate_into(qk, cos, sin, rotary_dim, interleaved, _new_like(qk))
        return out[:, : q.shape[1]], out[:, q.shape[1]:]
    q_out = _rotate_into(q, cos, sin, rotary_dim, interleaved, _new_like(q))
    k_out = _rotate_into(k, cos.to(k.dtype), sin.to(k.dtype), rotary_dim, interleaved, _new_like(k))
    return q_out, k_out


# ---- norms and activations ----------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
):
    """RMSNorm of x (of x + residual, returning (normed, sum) when residual is given)."""
    if residual is not None:
        x = x + residual
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and not weight_offset and x.is_contiguous():
        normed = _rms_norm_fp32(x, weight, eps)
    else:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if weight_offset:
            # Gemma: scale by (offset + weight) in float32, then cast (HF Gemma2RMSNorm)
            normed = (h * (weight_offset + weight.float())).type_as(x)
        else:
            # Llama: cast first, then scale in the weight's dtype (HF LlamaRMSNorm)
            normed = weight * h.to(x.dtype)
    return normed if residual is None else (normed, x)


def _rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm in float32, bit for bit: weight * (x * rsqrt(mean(x^2) + eps)), where the
    casts are no-ops; x^2 and the result share one buffer, the [T, 1] statistics update in place."""
    out = x.pow(2)  # [T, N], contiguous like x
    inv_rms = out.mean(-1, keepdim=True).add_(eps).rsqrt_()
    return torch.mul(x, inv_rms, out=out).mul_(weight)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None = None,
):
    """LayerNorm of x (of x + residual, returning (normed, sum) when residual is given)."""
    if residual is not None:
        x = x + residual
    normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return normed if residual is None else (normed, x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # the product goes into silu's output: one new tensor, not two


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> gelu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


# ---- mixture of experts -------------------------------------------------------------------------
def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token from router_logits [T, E]: (weights [T, k] float32, ids [T, k] int64).
    Softmax in float32, then torch.topk as HF does (so exact ties pick the same experts)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights, ids


_GATED = {"silu": silu_and_mul, "gelu": gelu_and_mul, "gelu_tanh": lambda x: gelu_and_mul(x, "tanh")}


def moe_experts(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, activation: str = "silu",
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for x [T, H]; w_gate_up [E, 2I, H]
    ([gate | up] rows), w_down [E, H, I]. One matmul per expert over its tokens, sorted by expert."""
    if activation not in _GATED:
        raise ValueError(f"moe_experts activation must be one of {sorted(_GATED)}, got {activation!r}")
    T, K = topk_ids.shape
    out = torch.zeros_like(x)
    if T == 0:
        return out
    flat_ids = topk_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)  # pair index t * K + k, grouped by expert
    tokens = order // K
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    rows = x.index_select(0, tokens)  # [T*K, H]
    expert_out = torch.empty_like(rows)
    act = _GATED[activation]
    start = 0
    for e, n in enumerate(counts):
        if n:
            h = act(F.linear(rows[start: start + n], w_gate_up[e]))
            torch.matmul(h, w_down[e].t(), out=expert_out[start: start + n])
            start += n
    # weigh in float32 and add into the token's row in expert order, as HF's experts loop does
    weights = topk_weights.reshape(-1).index_select(0, order).float()[:, None]
    expert_out = (expert_out.float() * weights).to(x.dtype)
    return out.index_add_(0, tokens, expert_out)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T + bias, where weight is a tensor [N, K] or a QuantizedWeight: the
    reference for quantized weights dequantizes the whole matrix to x's dtype first (and, for a
    W8A8 weight, quantize-dequantizes x as its `input_quant` says)."""
    if isinstance(weight, QuantizedWeight):
        if weight.input_quant is not None:
            x = weight.input_quant(x)
        weight = weight.dequantize(x.dtype)
    return F.linear(x, weight, bias)
