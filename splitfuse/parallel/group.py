"""Rank 0's side of the group: start the worker ranks, join the process group with them, send each
step, and fail clearly (never hang) when a worker dies.

Workers exit when the engine closes or its process dies: each holds one end of a pipe to rank 0 and
exits when the pipe closes (see worker.py).
"""

from __future__ import annotations

import datetime
import multiprocessing
import socket
import weakref
from dataclasses import dataclass
from multiprocessing.connection import wait

import torch

from splitfuse.config import EngineConfig
from splitfuse.core.batch import BatchMeta
from splitfuse.parallel.shard import Shard

# How long rank 0 waits for workers to load their shards and join; a collective's own limit too.
JOIN_TIMEOUT = datetime.timedelta(minutes=10)
# How long a worker gets to exit once its pipe closes before it is killed.
EXIT_GRACE_S = 5.0


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed or died: the engine cannot run another step."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker rank needs to build its shard of the engine."""

    model: str
    backend: str
    config: EngineConfig
    distributed_backend: str
    init_method: str
    world_size: int
    on_cpu: bool  # every rank runs on the one CPU device; else rank r takes device first_device + r
    first_device: int  # rank 0's device index (a replica's ranks take the devices after its first)
    num_threads: int  # torch threads of each rank: as many as rank 0 has

    def device_index(self, rank: int) -> int:
        return 0 if self.on_cpu else self.first_device + rank


class TensorParallelGroup:
    """Worker ranks 1..size-1 and the process group rank 0 (this process) shares with them."""

    def __init__(self, model: str, backend, config: EngineConfig) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("tensor_parallel_size > 1: this process already belongs to a torch.distributed "
                               "group (another tensor-parallel engine still open?); close it first")
        from splitfuse.parallel.worker import worker_main

        size = config.tensor_parallel_size
        self.shard = Shard(0, size)
        self._spec = WorkerSpec(str(model), backend.name, config, process_group_backend(backend),
                                f"tcp://127.0.0.1:{_free_port()}", size, backend.device.type == "cpu",
                                backend.device.index or 0, torch.get_num_threads())
        context = multiprocessing.get_context("spawn")  # a fork would copy this process's threads and state
        self.workers: list[multiprocessing.Process] = []
        self._pipes = []
        self._state = {"joined": False}  # shared with the finalizer, which must not hold self
        self._failure: str | None = None
        self._errors: dict[object, str] = {}  # pipe -> the error its worker reported
        for rank in range(1, size):
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(rank, self._spec, theirs), daemon=True,
                                      name=f"splitfuse-tp-rank{rank}")
            process.start()
            theirs.close()
            self.workers.append(process)
            self._pipes.append(ours)
        self._close = weakref.finalize(self, _shut_down, self.workers, self._pipes, self._state)

    def join(self) -> None:
        """Wait until every worker has loaded its shard, then form the process group with them."""
        import torch.distributed as dist

        waiting = dict(zip(self._pipes, self.workers))
        while waiting:
            ready = wait(list(waiting) + [p.sentinel for p in waiting.values()], JOIN_TIMEOUT.total_seconds())
            if not ready:
                raise WorkerError(f"tensor-parallel workers did not load their shards within {JOIN_TIMEOUT}")
            for pipe, process in list(waiting.items()):
                if pipe not in ready and process.sentinel not in ready:
                    continue
                if self._read(pipe) == "ready":
                    del waiting[pipe]
                else:
                    process.join(timeout=1.0)  # its pipe closed as it exited: let it finish
                    raise WorkerError(self._describe_failure())
        dist.init_process_group(self._spec.distributed_backend, init_method=self._spec.init_method, rank=0,
                                world_size=self._spec.world_size, timeout=JOIN_TIMEOUT)
        self._state["joined"] = True

    def agree_num_kv_blocks(self, num_blocks: int) -> int:
        """The fewest KV blocks any rank has room for: every rank allocates that many."""
        return self._collective(agree_num_kv_blocks, num_blocks)

    def broadcast_step(self, meta: BatchMeta) -> None:
        """Send a step's host-side metadata to every worker before rank 0 runs its own forward."""
        from splitfuse.parallel.step_meta import broadcast_step

        self.check_alive()
        self._collective(broadcast_step, meta)

    def check_alive(self) -> None:
        """Raise WorkerError if a worker has failed or exited."""
        if self._failure is None and any(not p.is_alive() for p in self.workers):
            self._failure = self._describe_failure()
        if self._failure is not None:
            raise WorkerError(self._failure)

    def close(self) -> None:
        """Stop the workers and leave the process group; idempotent."""
        if self._failure is None:
            self._failure = "the tensor-parallel engine is closed: build a new one"
        self._close()

    def abandon(self, cause: BaseException) -> None:
        """A step failed: the workers may wait in a collective rank 0 left, so stop them, and make
        every later step raise."""
        if self._failure is None:
            self._failure = (f"a step failed ({type(cause).__name__}: {cause}), which leaves the tensor-parallel "
                             "ranks out of step; the engine cannot run more steps: close it and build a new one")
        self.close()

    def _collective(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as exc:  # a peer's socket closed mid-collective: say which worker and why
            for process in self.workers:
                process.join(timeout=1.0)
            self.check_alive()
            raise WorkerError(f"tensor-parallel collective failed: {exc}") from exc

    def _describe_failure(self) -> str:
        """Each dead worker's rank, pid, exit code and the error it reported, if any."""
        lines = []
        for rank, (process, pipe) in enumerate(zip(self.workers, self._pipes), start=1):
            if process.is_alive():
                continue
            self._read(pipe)
            message = self._errors.get(pipe)
            lines.append(f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code "
                         f"{process.exitcode}" + (f": {message}" if message else ""))
        detail = "; ".join(lines) or "a tensor-parallel worker stopped answering"
        return detail + "; the engine cannot run more steps: close it and build a new one"

    def _read(self, pipe) -> str | None:
        """The last message waiting on a worker's pipe, if any; errors are kept for the report."""
        message = None
        try:
            while pipe.poll():
                message = pipe.recv()
                if message != "ready":
                    self._errors[pipe] = message
        except (EOFError, OSError):
            pass
        return message


def process_group_backend(backend) -> str:
    """The process group's backend: the accelerator's for its device tensors (the all-reduces), with
    gloo beside it for the host tensors (each step's metadata, the KV block count)."""
    name = type(backend).distributed_backend()
    device = backend.device.type
    return name if device == "cpu" or name == "gloo" else f"cpu:gloo,{device}:{name}"


def agree_num_kv_blocks(num_blocks: int) -> int:
    """The minimum of num_blocks over all ranks (every rank calls this once, after joining)."""
    import torch.distributed as dist

    value = torch.tensor([num_blocks], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def _shut_down(workers, pipes, state) -> None:
    """Close every worker's pipe (they exit on it), kill those that linger, leave the group."""
    for pipe in pipes:
        pipe.close()
    for process in workers:
        # before joining a worker may still be importing, its pipe not yet watched: no point waiting
        process.join(timeout=EXIT_GRACE_S if state["joined"] else 0)
        if process.is_alive():
            process.kill()
            process.join()
    if state["joined"]:
        import torch.distributed as dist

        state["joined"] = False
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
