"""Reference ops in plain torch: the default of every Backend op and the CPU backend's speed path.

Pure functions, no device-specific API: they run wherever their tensors live. Numerics follow
Hugging Face transformers' eager implementations so fp32 outputs can be compared token for token.
Shapes: T tokens of one ragged batch, S sequences, H query heads, Hkv key/value heads, D head size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from splitfuse.core.batch import BatchMeta

# Elements (float32) one attention group may hold at once: its scores plus its gathered K and V.
# Big enough that a batch of decodes runs in a few batched matmuls, small enough to keep long
# prompt chunks from allocating gigabytes.
_GROUP_BUDGET = 1 << 25
# Padding a group may add for free (elements); beyond it, at most a third of a group is padding.
_PAD_SLACK = 1 << 19
_PAD_RATIO = 1.5


# ---- KV cache -----------------------------------------------------------------------------------
def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hkv, D] into kv_layer [2, num_blocks, block_size, Hkv, D] at slot_mapping [T]."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_layer.shape
    # view (not reshape) so a non-contiguous cache fails loudly instead of writing into a copy
    slots = kv_layer.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    slots[0].index_copy_(0, slot_mapping, k.to(kv_layer.dtype))
    slots[1].index_copy_(0, slot_mapping, v.to(kv_layer.dtype))


# ---- attention ----------------------------------------------------------------------------------
class _Group:
    """Index tensors for one padded batch of query pieces: B pieces x Q queries x L keys."""

    def __init__(self, pieces, meta: "BatchMeta", window: int | None, device: torch.device):
        # pieces: (seq, first_token, num_queries, first_key_pos, num_keys)
        self.B = len(pieces)
        self.Q = max(p[2] for p in pieces)
        self.L = max(p[4] for p in pieces)
        rows, valid, tokens = [], [], []
        for b, (_, t0, n, _, _) in enumerate(pieces):
            # padding rows repeat the piece's last query so no softmax row is fully masked
            rows.extend(t0 + min(i, n - 1) for i in range(self.Q))
            valid.extend(range(b * self.Q, b * self.Q + n))
            tokens.extend(range(t0, t0 + n))
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)  # [B*Q] token of each row
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=device)  # real tokens, in row order
        # None when every row is real, which is always the case for a group of decodes
        self.valid = None if len(valid) == len(rows) else torch.tensor(valid, dtype=torch.long, device=device)

        seq = torch.tensor([p[0] for p in pieces], dtype=torch.long, device=device)
        key_start = torch.tensor([p[3] for p in pieces], dtype=torch.long, device=device)
        last_key = torch.tensor([p[3] + p[4] - 1 for p in pieces], dtype=torch.long, device=device)
        key_pos = key_start[:, None] + torch.arange(self.L, device=device)  # [B, L]
        # padding keys read the piece's last key (an allocated slot); the mask hides them
        safe_pos = torch.minimum(key_pos, last_key[:, None])
        bs = meta.block_size
        blocks = meta.block_tables.to(device)[seq].long().gather(1, safe_pos // bs)  # [B, L]
        self.slots = (blocks * bs + safe_pos % bs).flatten()  # [B*L]

        q_pos = meta.positions.to(device)[self.rows].view(self.B, self.Q, 1)
        masked = key_pos[:, None, :] > q_pos  # causal; also hides padding keys (beyond the last query)
        if window is not None:
            masked |= q_pos - key_pos[:, None, :] >= window
        self.masked = masked  # [B, Q, L] True where a query must not see a key


def _plan(meta: "BatchMeta", num_heads: int, kv_row: int, window: int | None, device) -> list[_Group]:
    """Split the batch into padded groups; cached on meta since every layer reuses it."""
    key = (num_heads, kv_row, window, str(device))
    cache = meta.step_cache
    if key in cache:
        return cache[key]
    starts = meta.query_start_host or meta.query_start.tolist()
    ctx_lens = meta.context_lens_host or meta.context_lens.tolist()
    pieces = []
    for s in range(meta.num_seqs):
        t0, qlen = starts[s], starts[s + 1] - starts[s]
        first_pos = ctx_lens[s] - qlen  # new tokens are the last qlen of the context
        # long prompt chunks are cut into query pieces whose scores fit half the budget
        step = max(1, (_GROUP_BUDGET // 2) // (num_heads * max(ctx_lens[s], 1)))
        for a in range(0, qlen, step):
            n = min(step, qlen - a)
            key_start = 0 if window is None else max(0, first_pos + a - window + 1)
            pieces.append((s, t0 + a, n, key_start, first_pos + a + n - key_start))

    def cost(B, Q, L):
        return B * L * (Q * num_heads + 2 * kv_row)

    # similar shapes next to each other, then greedy groups that stay in budget and barely padded
    pieces.sort(key=lambda p: (p[2], p[4]))
    groups, cur, real, Q, L = [], [], 0, 0, 0
    for p in pieces:
        q2, l2, r2 = max(Q, p[2]), max(L, p[4]), real + cost(1, p[2], p[4])
        padded = cost(len(cur) + 1, q2, l2)
        if cur and (padded > _GROUP_BUDGET or padded > _PAD_RATIO * r2 + _PAD_SLACK):
            groups.append(cur)
            cur, q2, l2, r2 = [], p[2], p[4], cost(1, p[2], p[4])
        cur.append(p)
        Q, L, real = q2, l2, r2
    if cur:
        groups.append(cur)
    plan = [_Group(g, meta, window, device) for g in groups]
    cache[key] = plan
    return plan


def _workspace(meta: "BatchMeta", numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A scratch buffer owned by this step's meta, reused by every layer.

    Gathered K/V are tens of MiB; a fresh tensor per layer is a fresh mmap whose page faults cost
    several times the gather itself on the CPU.
    """
    cache = meta.step_cache
    key = ("workspace", dtype, str(device))
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def paged_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: "BatchMeta", scale: float,
    sliding_window: int | None = None, logit_softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of ragged q [T, H, D] over each sequence's paged K/V; returns [T, H, D]."""
    T, H, D = q.shape
    _, num_blocks, block_size, Hkv, _ = kv_layer.shape
    G = H // Hkv  # query heads per kv head; head h reads kv head h // G
    out = torch.empty(T, H, D, dtype=torch.float32, device=q.device)
    if T == 0:
        return out.to(q.dtype)
    q32 = q.float()
    rows = kv_layer.view(2, num_blocks * block_size, Hkv * D)  # one row per slot
    for g in _plan(meta, H, Hkv * D, sliding_window, q.device):
        B, Q, L = g.B, g.Q, g.L
        n = B * L * Hkv * D
        # gather each piece's keys and values, padded to L: [2, B, L, Hkv, D]
        kv = _workspace(meta, 2 * n, kv_layer.dtype, q.device).view(2, B * L, Hkv * D)
        torch.index_select(rows[0], 0, g.slots, out=kv[0])
        torch.index_select(rows[1], 0, g.slots, out=kv[1])
        if kv.dtype != torch.float32:
            kv = _workspace(meta, 2 * n, torch.float32, q.device).view_as(kv).copy_(kv)
        kv = kv.view(2, B, L, Hkv, D)
        qg = q32.index_select(0, g.rows).view(B, Q, Hkv, G, D).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Q, D]
        heads = []
        # one batched matmul per kv head: the strided [B, L, D] slice of the gathered K/V feeds
        # BLAS directly, where batching over (B, Hkv) would first need a transposing copy
        for h in range(Hkv):
            # same order of operations as HF eager attention: q@k^T * scale, softcap, mask, fp32 softmax, @v
            scores = torch.bmm(qg[:, h].reshape(B, G * Q, D), kv[0, :, :, h].transpose(1, 2)).mul_(scale)
            if logit_softcap is not None:
                scores.div_(logit_softcap).tanh_().mul_(logit_softcap)
            scores.view(B, G, Q, L).masked_fill_(g.masked[:, None], float("-inf"))
            heads.append(torch.bmm(torch.softmax(scores, dim=-1), kv[1, :, :, h]))  # [B, G*Q, D]
        o = torch.stack(heads, dim=1).view(B, Hkv, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B * Q, H, D)
        if g.valid is not None:
            o = o.index_select(0, g.valid)
        out.index_copy_(0, g.tokens, o)
    return out.to(q.dtype)


# ---- rotary embeddings --------------------------------------------------------------------------
def build_cos_sin_cache(
    inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[max_positions, rotary_dim] = cat(cos, sin), computed as HF's LlamaRotaryEmbedding does."""
    # position * inv_freq in float32, one product per element exactly like HF, so fp32 is bit-identical
    freqs = torch.arange(max_positions, device=inv_freq.device).float()[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """Rotate the first rotary_dim features of x [T, heads, D]; cos, sin [T, 1, rotary_dim/2]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]  # GPT-J pairs (x[2i], x[2i+1])
    else:
        x1, x2 = rot.chunk(2, dim=-1)  # neox halves, as HF rotate_half
    # same products and rounding as HF's q*cos + rotate_half(q)*sin
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    rotated = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rotary_dim: int | None = None, interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [T, H, D] and k [T, Hkv, D] at positions [T]; returns new tensors."""
    rotary_dim = rotary_dim or cos_sin.shape[-1]
    # HF casts cos/sin to the activation dtype and rotates in it
    cos, sin = cos_sin[positions].to(q.dtype)[:, None, :].chunk(2, dim=-1)  # [T, 1, rotary_dim/2] each
    q_out = _rotate(q, cos, sin, rotary_dim, interleaved)
    k_out = _rotate(k, cos.to(k.dtype), sin.to(k.dtype), rotary_dim, interleaved)
    return q_out, k_out


# ---- norms and activations ----------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
):
    """RMSNorm of x (of x + residual, returning (normed, sum) when residual is given)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        # Gemma: scale by (offset + weight) in float32, then cast (HF Gemma2RMSNorm)
        normed = (h * (weight_offset + weight.float())).type_as(x)
    else:
        # Llama: cast first, then scale in the weight's dtype (HF LlamaRMSNorm)
        normed = weight * h.to(x.dtype)
    return normed if residual is None else (normed, x)


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
    return F.silu(gate) * up


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> gelu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up
