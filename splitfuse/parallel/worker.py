"""A worker rank (1..tp-1): load this rank's shard, then run every step rank 0 broadcasts.

It exits when rank 0 closes its pipe or dies (the pipe reads EOF), and reports any error of its
own through the pipe before exiting, so rank 0 can say what went wrong.
"""

from __future__ import annotations

import os
import threading


def worker_main(rank: int, spec, pipe) -> None:
    """Process entry point of worker `rank` (spec: group.WorkerSpec)."""
    threading.Thread(target=_exit_when_closed, args=(pipe,), daemon=True, name="parent-watch").start()
    try:
        _serve(rank, spec, pipe)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to rank 0, then the process ends
        try:
            pipe.send(f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
        os._exit(1)


def _serve(rank: int, spec, pipe) -> None:
    import torch
    import torch.distributed as dist

    from splitfuse.assembly import kv_cache_size, prepare_weights
    from splitfuse.backends.selection import create_backend
    from splitfuse.models.loader import load_model
    from splitfuse.parallel.group import agree_num_kv_blocks
    from splitfuse.parallel.shard import Shard
    from splitfuse.parallel.step_meta import receive_step

    config = spec.config
    torch.set_num_threads(spec.num_threads)  # a spawned process starts with a thread per core
    backend = create_backend(spec.backend, spec.device_index(rank))
    model = load_model(spec.model, backend, config.dtype, config.max_model_len, config.trust_remote_code,
                       shard=Shard(rank, spec.world_size), quantization=config.quantization).model
    prepare_weights(model, backend, config)  # on-the-fly quantization of this rank's slices, as rank 0 does
    pipe.send("ready")
    dist.init_process_group(spec.distributed_backend, init_method=spec.init_method, rank=rank,
                            world_size=spec.world_size)
    block_size, num_blocks = kv_cache_size(model, backend, config)
    num_blocks = agree_num_kv_blocks(num_blocks)
    kv_cache = backend.allocate_kv_cache(model.num_layers, num_blocks, block_size, model.num_kv_heads,
                                         model.head_dim, model.dtype)
    backend.warm_up(model, kv_cache, config, model.max_model_len, block_size)
    while True:
        meta = backend.prepare_batch(receive_step())
        hidden = backend.forward(model, meta, kv_cache)
        model.logits(hidden[meta.sample_index])  # its part of the logits goes to rank 0


def _exit_when_closed(pipe) -> None:
    """Block on the pipe; rank 0 never writes, so a read returns only when rank 0 closed it or died."""
    try:
        while True:
            pipe.recv()
    except (EOFError, OSError):
        os._exit(0)
