"""The cuda backend: Triton kernels for the per-token ops and paged attention.

Importing this module imports neither triton nor the kernels and touches no CUDA API: the kernels
are imported on first use, availability is probed only when asked.

Interpreter mode: with TRITON_INTERPRET=1 in the environment (and triton installed) the backend is
available on the CPU, where Triton's interpreter runs the same kernels on CPU tensors. That mode is
for tests of the kernels (it is orders of magnitude slower than the cpu backend), so `auto` never
picks it; ask for it by name (`--backend cuda`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import random
import weakref

import torch

from splitfuse.backends.base import Backend
from splitfuse.core.batch import BatchMeta

log = logging.getLogger("splitfuse")

_GIB = 1 << 30

# Activation reserve kept out of the KV cache on the GPU. A step holds at most token_budget tokens;
# its largest live activations per token are the fused gate/up projection (2 x intermediate, about
# 7 x hidden), the qkv projection, the residual stream and a few hidden-size temporaries: under
# 16 x hidden elements, 32 x hidden bytes in bf16:
#   token_budget x hidden_size x 32 B  (768 tokens of an 8B model, hidden 4096 -> 96 MiB)
# The fixed part covers the logits and sampler scratch (max_seqs rows of a ~128K vocabulary in
# float32, plus sort buffers for top-p), Triton/cuBLAS workspaces and allocator fragmentation.
_RESERVE_BYTES_PER_HIDDEN = 32
_RESERVE_FIXED = 1 * _GIB
# Decode batches up to this size replay CUDA graphs; capture stops after the time limit (start-up
# must stay short), and larger batches, which are GPU-bound anyway, run eagerly.
_MAX_GRAPH_BATCH = 256
_GRAPH_CAPTURE_LIMIT_S = 30.0


def _interpreter_mode() -> bool:
    """TRITON_INTERPRET set (read at call time, not import time) to anything but 0/false."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _triton_import_error() -> str:
    """'' when triton imports, else why not."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        if getattr(exc, "name", None) == "triton":
            return "triton is not installed (pip install triton)"
        return f"triton cannot be imported: {exc}"
    except Exception as exc:  # a broken install must not break `splitfuse backends`
        return f"triton cannot be imported: {type(exc).__name__}: {exc}"
    return ""


def _paged_attention():
    from splitfuse.backends.triton.paged_attention import paged_attention

    return paged_attention


class CudaBackend(Backend):
    name = "cuda"
    priority = 100
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    # ---- discovery -------------------------------------------------------------------------
    @classmethod
    def interpreter_mode(cls) -> bool:
        """True when the kernels run under the Triton interpreter on the CPU (TRITON_INTERPRET=1)."""
        return _interpreter_mode()

    @classmethod
    def unavailable_reason(cls) -> str:
        if _interpreter_mode():
            return _triton_import_error()
        if not torch.cuda.is_available():
            return ("no CUDA device (torch.cuda.is_available() is False); TRITON_INTERPRET=1 runs the "
                    "kernels on the CPU for testing")
        return _triton_import_error()

    @classmethod
    def auto_selectable(cls) -> bool:
        return not _interpreter_mode()  # the interpreter is for tests: `auto` keeps choosing cpu

    @classmethod
    def device_count(cls) -> int:
        return 1 if _interpreter_mode() else torch.cuda.device_count()

    @classmethod
    def device_type(cls) -> str:
        return "cpu" if _interpreter_mode() else "cuda"

    def __init__(self, device_index: int = 0) -> None:
        super().__init__()
        self.interpreted = _interpreter_mode()
        if self.interpreted:
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", device_index)
            torch.cuda.set_device(self.device)  # kernels launch on the current device
        # kernels are imported here, not at module import (where triton may be absent)
        from splitfuse.backends.triton import activation, rms_norm, rotary_kv

        self._k_act, self._k_norm, self._k_rot = activation, rms_norm, rotary_kv
        # generator -> draws made through this backend: the sampling kernel's counter offset
        self._draws: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._graphs = None  # DecodeGraphs once warm_up captured them

    # ---- memory ----------------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        if self.interpreted:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def kv_block_size(self, head_dim: int) -> int:
        """32 tokens for head_dim <= 64, else 16 (vLLM's default).

        The attention kernel maps every key position through the block table, so any size is
        correct; what the size trades is block-table indirections per key tile (the kernel reads
        keys 32-64 positions at a time, so 16-token blocks mean up to 4 table entries per tile)
        against memory lost at the end of each sequence (up to block_size - 1 slots) and the
        granularity of block sharing. The lost bytes scale with block_size x head_dim, so keeping
        that product at about 2048 (32 x 64 = 16 x 128) keeps the waste the same while small heads
        get the fewer lookups; wider heads (>= 128) already move plenty of bytes per lookup."""
        return 32 if head_dim <= 64 else 16

    def num_kv_blocks(self, config, bytes_per_block: int, hidden_size: int) -> int:
        """GPU: gpu_memory_utilization of the device's TOTAL memory, minus what is already in use
        (the loaded weights, the CUDA context, other processes), minus an activation
        reserve (see _RESERVE_*). Interpreter: the base class's kv_cache_gib sizing."""
        if self.interpreted:
            return super().num_kv_blocks(config, bytes_per_block, hidden_size)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # loading temporaries cached by torch are free for the KV cache
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        reserve = _RESERVE_FIXED + config.token_budget * hidden_size * _RESERVE_BYTES_PER_HIDDEN
        budget = int(total * config.gpu_memory_utilization) - used - reserve
        blocks = budget // bytes_per_block
        if blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {config.gpu_memory_utilization:.0%} of "
                f"{total / _GIB:.1f} GiB minus {used / _GIB:.2f} GiB in use and a "
                f"{reserve / _GIB:.2f} GiB activation reserve leaves {budget / _GIB:.2f} GiB; raise "
                "gpu_memory_utilization, lower token_budget or set num_kv_blocks"
            )
        log.info("cuda KV cache: %d blocks (%.2f GiB) from %.1f GiB total, %.2f GiB in use, "
                 "%.2f GiB activation reserve, utilization %.2f", blocks, blocks * bytes_per_block / _GIB,
                 total / _GIB, used / _GIB, reserve / _GIB, config.gpu_memory_utilization)
        return int(blocks)

    def prepare_batch(self, meta: BatchMeta) -> BatchMeta:
        """GPU: each metadata tensor goes through pinned host memory and is copied asynchronously
        (torch's caching host allocator reuses the pinned buffers once their copies finish)."""
        if self.device.type == "cpu":
            return meta
        moved = {}
        for f in dataclasses.fields(meta):
            value = getattr(meta, f.name)
            if isinstance(value, torch.Tensor):
                if value.device.type == "cpu":
                    if not value.is_pinned():
                        value = value.pin_memory()  # staging buffer from torch's caching host allocator
                    value = value.to(self.device, non_blocking=True)
                elif value.device != self.device:
                    value = value.to(self.device)
            moved[f.name] = value
        moved["step_cache"] = {}  # scratch is per device and per step
        return BatchMeta(**moved)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- CUDA graphs -----------------------------------------------------------------------
    def warm_up(self, model, kv_cache, config, max_model_len: int, block_size: int) -> None:
        """Capture decode-step CUDA graphs (see graphs.py); skipped under the interpreter (no
        graphs on the CPU) and with enforce_eager. A model whose forward cannot be captured
        (e.g. it syncs with the host) keeps running eagerly, with a warning."""
        self._graphs = None
        if self.interpreted or config.enforce_eager:
            return
        from splitfuse.backends.cuda.graphs import DecodeGraphs

        graphs = DecodeGraphs(model, kv_cache, max_batch=min(config.max_seqs, config.token_budget, _MAX_GRAPH_BATCH),
                              max_model_len=max_model_len, block_size=block_size, device=self.device,
                              use_graphs=True)
        try:
            seconds = graphs.capture(_GRAPH_CAPTURE_LIMIT_S)
        except Exception as exc:  # capture is an optimisation: never fail start-up for it
            log.warning("CUDA graph capture failed, decode steps run eagerly (enforce_eager=True hides "
                        "this): %s: %s", type(exc).__name__, exc)
            torch.cuda.synchronize(self.device)
            return
        log.info("CUDA graphs: %d decode batch sizes up to %d captured in %.1f s", len(graphs.buckets),
                 graphs.max_batch, seconds)
        self._graphs = graphs

    def forward(self, model, meta: BatchMeta, kv_cache):
        graphs = self._graphs
        if graphs is not None and graphs.model is model and graphs.bucket_for(meta) is not None:
            return graphs.run(meta)
        return super().forward(model, meta, kv_cache)

    # ---- model ops -------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps, residual=None, weight_offset=0.0):
        return self._k_norm.rms_norm(x, weight, eps, residual, weight_offset)

    def layer_norm(self, x, weight, bias, eps, residual=None):
        from splitfuse.backends.triton.layer_norm import layer_norm

        return layer_norm(x, weight, bias, eps, residual)

    def silu_and_mul(self, x):
        return self._k_act.silu_and_mul(x)

    def gelu_and_mul(self, x, approximate="none"):
        return self._k_act.gelu_and_mul(x, approximate)

    def moe_experts(self, x, topk_weights, topk_ids, w_gate_up, w_down, activation="silu"):
        from splitfuse.backends.triton.moe import moe_experts

        return moe_experts(x, topk_weights, topk_ids, w_gate_up, w_down, activation)

    def rotary(self, q, k, positions, cos_sin, rotary_dim=None, interleaved=False):
        return self._k_rot.rotary_and_cache(q, k, None, positions, cos_sin, None, None, rotary_dim, interleaved)

    def rotary_attention(self, q, k, v, positions, cos_sin, kv_layer, meta, scale, sliding_window=None,
                         logit_softcap=None, rotary_dim=None, interleaved=False):
        # one launch rotates q and k and stores rotated k and v into the cache; attention then
        # reads every key (new ones included) from the cache
        q_rot, _ = self._k_rot.rotary_and_cache(q, k, v, positions, cos_sin, kv_layer, meta.slot_mapping,
                                                rotary_dim, interleaved, return_k=False)
        return _paged_attention()(q_rot, kv_layer, meta, scale, sliding_window, logit_softcap)

    def attention(self, q, k, v, kv_layer, meta, scale, sliding_window=None, logit_softcap=None):
        self._k_rot.write_kv(k, v, kv_layer, meta.slot_mapping)
        return _paged_attention()(q, kv_layer, meta, scale, sliding_window, logit_softcap)

    # ---- sampling --------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """Next tokens [S'] int64 on the device, sampled by one Triton launch (plus one sort when
        a row uses top-k/top-p) with no host sync; see kernels/sampling.py.

        Randomness: the kernel's noise is counter-based. Each row's seed is its generator's
        initial_seed() and its offset the number of draws made so far through this backend for
        that generator (kept in a WeakKeyDictionary, so finished requests drop out). A seeded
        request therefore samples the same tokens alone or in any batch, run after run; but the
        cpu backend draws from the generator's own stream, so the two backends give different
        (each reproducible) tokens for the same seed. The generator's state is not advanced."""
        if batch.all_greedy and not any(batch.suppressed):
            return logits.argmax(dim=-1)
        from splitfuse.backends.triton.sampling import sample

        floats, ints, num_filter, width = self._sampling_tensors(batch, logits.shape[-1])
        S = len(batch.temperatures)
        floats, ints = self._to_device(floats), self._to_device(ints)
        top_ks, seeds, offsets = ints[:S], ints[S:2 * S], ints[2 * S:3 * S]
        filter_rows = ints[3 * S:3 * S + num_filter]
        suppressed = ints[3 * S + num_filter:].view(S, width) if width else None
        return sample(logits, floats[0], top_ks, floats[1], seeds, offsets, suppressed=suppressed,
                      filter_rows=filter_rows)

    def _sampling_tensors(self, batch, vocab: int):
        """Host-side per-row settings packed into two CPU tensors (two small copies per step):
        floats [2, S'] = temperatures, top_ps; ints = top_ks | seeds | offsets | rows that filter
        | suppressed ids [S', M] (-1 padding). Advances the draw counters of the sampled rows."""
        draws = self._draws
        S = len(batch.temperatures)
        seeds, offsets, filter_rows = [0] * S, [0] * S, []
        for row, (temp, top_k, top_p, gen) in enumerate(
            zip(batch.temperatures, batch.top_ks, batch.top_ps, batch.generators)
        ):
            if temp == 0 or top_k == 1:
                continue
            if 0 < top_k < vocab or top_p < 1.0:
                filter_rows.append(row)
            if gen is None:  # a sampled row without a generator: unseeded, like the global RNG
                seeds[row] = random.getrandbits(63)
                continue
            seed = gen.initial_seed() & 0xFFFFFFFFFFFFFFFF  # a uint64; the kernel reads the bits
            seeds[row] = seed - (1 << 64) if seed >= 1 << 63 else seed
            offsets[row] = draws.get(gen, 0)
            draws[gen] = offsets[row] + 1  # per occurrence: a shared generator gets fresh noise
        width = max((len(ids) for ids in batch.suppressed), default=0)
        padded = [id_ for ids in batch.suppressed for id_ in list(ids) + [-1] * (width - len(ids))]
        floats = torch.tensor([batch.temperatures, batch.top_ps], dtype=torch.float32)
        ints = torch.tensor(list(batch.top_ks) + seeds + offsets + filter_rows + padded, dtype=torch.int64)
        return floats, ints, len(filter_rows), width

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A pinned, non-blocking copy on the GPU (no stream sync, as in prepare_batch)."""
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def describe(self) -> str:
        if self.interpreted:
            return "cuda (Triton interpreter on cpu)"
        props = torch.cuda.get_device_properties(self.device)
        return f"cuda ({props.name}, {props.total_memory / _GIB:.0f} GiB, device {self.device.index})"


__all__ = ["CudaBackend"]
