"""Assembly: a model directory + a backend + an EngineConfig -> a ready Engine.

The one place where the KV block size and count are resolved; the result is on `engine.settings`
(EngineSettings), so front ends and benchmarks read it instead of deriving it again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from splitfuse.backends.selection import create_backend
from splitfuse.config import EngineConfig
from splitfuse.core.engine import Engine, EngineSettings
from splitfuse.models.loader import load_model
from splitfuse.quant import quantize_model, weight_bytes

log = logging.getLogger("splitfuse")

__all__ = ["EngineSettings", "assemble_engine", "build_engine", "kv_cache_size", "prepare_weights"]


def build_engine(model: str | Path | None = None, backend: str | None = "auto", config: EngineConfig | None = None,
                 device_index: int = 0) -> Engine:
    """Load a model directory (None = the embedded default model) onto a backend's device_index-th
    device and size its KV cache; what was resolved is on `engine.settings`."""
    config = config or EngineConfig()
    if model is None:
        from splitfuse.data import default_model_dir

        model = default_model_dir()
    backend_impl = create_backend(backend, device_index)
    if config.tensor_parallel_size > 1:
        return _build_tensor_parallel_engine(model, backend_impl, config)
    loaded = load_model(model, backend_impl, config.dtype, config.max_model_len, config.trust_remote_code,
                        quantization=config.quantization)
    return assemble_engine(loaded.model, backend_impl, config, loaded.tokenizer, loaded.eos_token_ids,
                           loaded.sampling_defaults)


def _build_tensor_parallel_engine(model: str | Path, backend, config: EngineConfig) -> Engine:
    """Rank 0's engine: worker ranks start and load their shards while this process loads its own;
    the group closes with the engine (or if building it fails)."""
    from splitfuse.parallel.group import TensorParallelGroup

    group = TensorParallelGroup(model, backend, config)
    try:
        loaded = load_model(model, backend, config.dtype, config.max_model_len, config.trust_remote_code,
                            shard=group.shard, quantization=config.quantization)
        group.join()
        return assemble_engine(loaded.model, backend, config, loaded.tokenizer, loaded.eos_token_ids,
                               loaded.sampling_defaults, parallel=group)
    except BaseException:
        group.close()
        raise


def prepare_weights(model, backend, config: EngineConfig) -> None:
    """After loading (a whole model or one rank's shard): quantize the linear layers if
    config.quantization says so, and log what the weights take."""
    if config.quantization:
        quantize_model(model, backend, config.quantization)
    num_bytes = weight_bytes(model.weights)
    log.info("weights: %d bytes, %.1f MiB (%s)", num_bytes, num_bytes / (1 << 20),
             getattr(model, "quantization", None) or str(model.dtype).replace("torch.", ""))


def kv_cache_size(model, backend, config: EngineConfig) -> tuple[int, int]:
    """(tokens per KV block, KV blocks) for a loaded model: from config, else the backend's choice."""
    block_size = config.kv_block_size or backend.kv_block_size(model.head_dim)
    num_blocks = config.num_kv_blocks or backend.num_kv_blocks(
        config, model.kv_bytes_per_block(block_size), model.hidden_size
    )
    return block_size, num_blocks


def bind_cpu_threads(backend, spec: str) -> None:
    """Pin the cpu backend's OpenMP threads (EngineConfig.cpu_threads_bind); other backends refuse it."""
    from splitfuse.backends.cpu import CpuBackend
    from splitfuse.backends.cpu.threads import bind_threads

    if not isinstance(backend, CpuBackend):
        raise ValueError(f"cpu_threads_bind={spec!r} applies to the cpu backend only, not {backend.name!r}")
    log.info("OpenMP threads pinned to CPUs %s", bind_threads(spec))


def assemble_engine(model, backend, config: EngineConfig, tokenizer=None, eos_token_ids: Iterable[int] = (),
                    sampling_defaults: dict | None = None, parallel=None) -> Engine:
    """An Engine over a model already on the backend's device (loaded from a directory, or built
    with random weights by a benchmark): linear layers are quantized if config.quantization says so,
    then the KV cache is sized from config, else by the backend (seeing the smaller weights).
    `parallel`: the TensorParallelGroup of a sharded model, whose ranks agree on one block count."""
    if config.cpu_threads_bind not in (None, "none"):
        bind_cpu_threads(backend, config.cpu_threads_bind)
    prepare_weights(model, backend, config)
    block_size, num_blocks = kv_cache_size(model, backend, config)
    if parallel is not None:
        num_blocks = parallel.agree_num_kv_blocks(num_blocks)
    log.info("KV cache: %d blocks of %d tokens (%d tokens) on %s", num_blocks, block_size,
             num_blocks * block_size, backend.describe())
    return Engine(model, backend, tokenizer, config, list(eos_token_ids), model.max_model_len, num_blocks,
                  block_size, sampling_defaults, parallel)
