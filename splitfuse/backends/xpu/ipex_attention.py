"""Paged attention from intel-extension-for-pytorch (the optional `splitfuse[xpu]` extra).

Nothing depends on it: `load()` imports it lazily and returns None when it is absent or broken.
Its `PagedAttention.flash_attn_varlen_func` reads the cache in splitfuse's own layout (keys and
values as [num_blocks, block_size, Hkv, D]) through the block table, with causal masking aligned to
the end of each sequence, which is exactly the ragged-step semantics (prompt chunks and decodes).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

import torch

log = logging.getLogger("splitfuse")

MODULE = "intel_extension_for_pytorch"
# fp32 stays on the Triton/torch path: it is the accuracy path, compared token for token with HF
DTYPES = (torch.float16, torch.bfloat16)


def load():
    """IPEX's PagedAttention class, or None when IPEX is not installed or fails to import."""
    try:
        if importlib.util.find_spec(MODULE) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        ipex = importlib.import_module(MODULE)
        return ipex.llm.modules.PagedAttention
    except Exception as exc:  # e.g. built for another torch: warn and run without it
        log.warning("intel-extension-for-pytorch is installed but unusable (%s: %s); xpu attention "
                    "uses splitfuse's own kernels", type(exc).__name__, exc)
        return None


def _kv_starts(meta, device: torch.device) -> torch.Tensor:
    """cu_seqlens of the keys, [S+1] int32: built once per step, reused by every layer."""
    key = ("ipex_kv_starts", str(device))
    starts = meta.step_cache.get(key)
    if starts is None:
        lens = meta.context_lens_host or meta.context_lens.tolist()
        host = [0]
        for n in lens:
            host.append(host[-1] + n)
        starts = meta.step_cache[key] = torch.tensor(host, dtype=torch.int32).to(device)
    return starts


def paged_attention(paged_attention_cls, q: torch.Tensor, kv_layer: torch.Tensor, meta, scale: float,
                    sliding_window: int | None = None, logit_softcap: float | None = None) -> torch.Tensor:
    """splitfuse's attention semantics on IPEX: q [T, H, D] over kv_layer [2, blocks, block_size, Hkv, D]."""
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    extra = {}
    if sliding_window is not None:
        # flash-attention's left window counts keys strictly before the query: p - j <= left
        extra.update(window_size_left=sliding_window - 1, window_size_right=0)
    if logit_softcap is not None:
        extra["softcap"] = float(logit_softcap)
    paged_attention_cls.flash_attn_varlen_func(
        out, q.contiguous(), kv_layer[0], kv_layer[1], meta.query_start, _kv_starts(meta, q.device),
        meta.max_query_len, meta.max_context_len, float(scale), True, meta.block_tables, None, **extra,
    )
    return out
