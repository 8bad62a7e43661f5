"""Device graphs (CUDA graphs; XPU graphs through the same torch API) for decode-only steps: one
graph per batch-size bucket, captured at start-up.

A decode step launches a few kernels per layer with tiny grids, so at small batch sizes the
CPU cannot issue them as fast as the GPU runs them. A captured graph replays the whole model
forward with one launch. Graphs need fixed shapes and addresses, so each bucket owns static
metadata tensors; a step of S sequences runs in the smallest bucket B >= S, with rows S..B-1
padded so they are harmless:

  * slot -1: the KV-cache write skips the row (the rotary+KV kernel masks slot < 0);
  * context length 1 and position 0: the row reads one cached key of block 0 (any finite data)
    and its output row is dropped;
  * the attention tile table and split-KV count are fixed per bucket, chosen for the longest
    context the engine allows; the kernel cuts each sequence's key range by its real length at
    run time, so short contexts leave trailing partitions empty (they exit at once).

Mixed steps (any prompt chunk) and decode batches above the largest bucket run eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from splitfuse.core.batch import BatchMeta

log = logging.getLogger("splitfuse")

# The graph class of each torch device module (both have graph(graph, pool=...) to capture into it).
_GRAPH_CLASSES = {"cuda": "CUDAGraph", "xpu": "XPUGraph"}

# Buckets: small batches one by one where the relative padding cost is largest, then every 8
# sequences up to 64 and every 16 above (vLLM-like spacing).
_SMALL_BUCKETS = (1, 2, 4, 8)


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture, ascending, the largest being max_batch."""
    if max_batch < 1:
        return []
    sizes = [b for b in _SMALL_BUCKETS if b < max_batch]
    sizes += [b for b in range(16, min(max_batch, 64) + 1, 8) if b < max_batch]
    sizes += [b for b in range(80, max_batch, 16)]
    return sizes + [max_batch]


@dataclass
class _Bucket:
    meta: BatchMeta  # static tensors the graph reads
    hidden: torch.Tensor | None = None  # the graph's output [B, hidden]
    graph: object | None = None  # torch.cuda.CUDAGraph (or XPUGraph), or None when run eagerly (no GPU)


class DecodeGraphs:
    """Static-shape decode steps for one model and KV cache.

    use_graphs=False keeps the same padded static-buffer path but runs it eagerly; that is how the
    padding rules are tested without a GPU (the Triton interpreter has no graphs). device_module is
    the torch module that captures (torch.cuda unless given: torch.xpu has the same graph API).
    """

    def __init__(self, model, kv_cache: list[torch.Tensor], *, max_batch: int, max_model_len: int,
                 block_size: int, device: torch.device, use_graphs: bool, device_module=None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.use_graphs = use_graphs
        self.device_module = torch.cuda if device_module is None else device_module
        self.buckets: dict[int, _Bucket] = {}
        self._sizes = batch_buckets(max_batch)
        self._pool = None

    @property
    def max_batch(self) -> int:
        return max(self.buckets, default=0)

    def capture(self, time_limit_s: float = 30.0) -> float:
        """Capture buckets largest first (smaller graphs reuse the largest one's memory pool);
        stops early at time_limit_s, keeping what was captured. Returns the seconds spent."""
        start = time.perf_counter()
        for size in reversed(self._sizes):
            if time.perf_counter() - start > time_limit_s:
                log.warning("CUDA graph capture stopped after %.1f s with %d of %d batch sizes captured; "
                            "smaller decode batches run padded in the smallest captured one",
                            time_limit_s, len(self.buckets), len(self._sizes))
                break
            bucket = _Bucket(self._static_meta(size))
            self._run_eager(bucket)  # compiles the kernels and fills per-step scratch outside capture
            if self.use_graphs:
                self._capture(bucket)
            self.buckets[size] = bucket
        # a batch whose own bucket was not reached runs padded in the next larger one
        return time.perf_counter() - start

    def _capture(self, bucket: _Bucket) -> None:
        module = self.device_module
        graph = getattr(module, _GRAPH_CLASSES[self.device.type])()
        module.synchronize(self.device)
        with module.graph(graph, pool=self._pool):
            bucket.hidden = self._forward(bucket.meta)
        if self._pool is None:
            self._pool = graph.pool()
        bucket.graph = graph

    def _run_eager(self, bucket: _Bucket) -> None:
        bucket.hidden = self._forward(bucket.meta)

    def _forward(self, meta: BatchMeta) -> torch.Tensor:
        return self.model.forward(meta.input_ids, meta.positions, meta, self.kv_cache)

    def _static_meta(self, size: int) -> BatchMeta:
        """Padding-valued metadata for `size` decodes. The host fields describe the worst case
        (every context at max_model_len) so the attention wrapper fixes a split count that any
        real step can use; its tile table, built from them, is cached in step_cache."""
        dev = self.device
        return BatchMeta(
            input_ids=torch.zeros(size, dtype=torch.int64, device=dev),
            positions=torch.zeros(size, dtype=torch.int64, device=dev),
            query_start=torch.arange(size + 1, dtype=torch.int32, device=dev),
            context_lens=torch.ones(size, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(size, self.max_blocks, dtype=torch.int32, device=dev),
            slot_mapping=torch.full((size,), -1, dtype=torch.int64, device=dev),
            token_seq=torch.arange(size, dtype=torch.int64, device=dev),
            sample_index=torch.arange(size, dtype=torch.int64, device=dev),
            num_tokens=size, num_seqs=size, max_query_len=1, max_context_len=self.max_model_len,
            block_size=self.block_size, is_decode_only=True,
            query_start_host=list(range(size + 1)), context_lens_host=[self.max_model_len] * size,
            seq_lens=torch.ones(size, dtype=torch.int32, device=dev),
        )

    def bucket_for(self, meta: BatchMeta) -> int | None:
        """The bucket a step runs in, or None when it must run eagerly."""
        if not meta.is_decode_only or meta.num_seqs > self.max_batch or meta.block_size != self.block_size:
            return None
        return min(b for b in self.buckets if b >= meta.num_seqs)

    def run(self, meta: BatchMeta) -> torch.Tensor:
        """Hidden states [S, hidden] of a decode-only step (meta on the device), via its bucket."""
        size = self.bucket_for(meta)
        if size is None:
            raise ValueError(f"no decode bucket for {meta.num_seqs} sequences (decode-only: {meta.is_decode_only})")
        bucket = self.buckets[size]
        static, n = bucket.meta, meta.num_seqs
        static.input_ids[:n].copy_(meta.input_ids)
        static.positions[:n].copy_(meta.positions)
        static.slot_mapping[:n].copy_(meta.slot_mapping)
        static.context_lens[:n].copy_(meta.context_lens)
        static.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if meta.seq_lens is not None:
            static.seq_lens[:n].copy_(meta.seq_lens)
        if n < size:  # rows a previous, larger step left behind become padding again
            static.input_ids[n:].zero_()
            static.positions[n:].zero_()
            static.slot_mapping[n:].fill_(-1)
            static.context_lens[n:].fill_(1)
            static.seq_lens[n:].fill_(1)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._run_eager(bucket)
        return bucket.hidden[:n]
