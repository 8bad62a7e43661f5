"""Replicas as Ray actors: each actor holds one engine and runs the shared EngineLoop; the pool
(replicas.py) routes to them exactly as to local processes.

The front end sends commands with send() and reads each actor's reports from one Ray streaming
generator, events(), which yields them as the loop makes them: no polling. Each actor sits in a
placement group of its own holding what its engine needs (GPUs = tensor_parallel_size on a device,
CPU cores on the cpu). A killed actor is restarted by Ray (max_restarts); the pool resends its
unstarted requests meanwhile and takes it back once hello() answers again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

from splitfuse.backends.selection import backend_class
from splitfuse.config import EngineConfig
from splitfuse.serving.bridge import CommandQueue
from splitfuse.serving.errors import EngineStopped
from splitfuse.serving.loop import Command, EngineLoop

log = logging.getLogger("splitfuse.serving")

RAY_MISSING = "replicas on Ray need the ray package, which is not installed: pip install splitfuse[ray]"


def import_ray():
    """The ray module, or ImportError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    return ray


class ReplicaActor:
    """One engine in a Ray actor (wrapped by ray.remote at launch, so this module imports without Ray)."""

    def __init__(self, build: Callable[[], object], num_threads: int | None) -> None:
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)  # its share of the node's cores, not one thread per core
        self.engine = build()
        self.commands = CommandQueue()
        self.reports: asyncio.Queue | None = None
        self.thread: threading.Thread | None = None

    async def hello(self) -> dict:
        """Start the engine loop (once per actor life) and describe the engine."""
        if self.thread is None:
            self.reports = asyncio.Queue()
            self._event_loop = asyncio.get_running_loop()
            self.thread = threading.Thread(target=self._run, name="splitfuse-engine", daemon=True)
            self.thread.start()
        engine = self.engine
        return {"tokenizer": engine.tokenizer, "settings": engine.settings, "max_model_len": engine.max_model_len,
                "sampling_defaults": dict(engine.sampling_defaults), "pid": os.getpid()}

    async def send(self, command: Command) -> None:
        try:
            self.commands.put(command)
        except EngineStopped:
            pass  # closed: the loop has answered everything it will

    async def events(self):
        """The loop's reports, in order, in batches of what has accumulated; ends after Close."""
        while True:
            batch = [await self.reports.get()]
            while not self.reports.empty():
                batch.append(self.reports.get_nowait())
            yield batch
            if batch[-1][0] == "closed":
                return

    async def join(self) -> None:
        """Returns once the loop has stopped (after Close)."""
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join)

    def _run(self) -> None:
        # The pool alone limits the queue, so a replica never turns away what the pool admitted.
        try:
            EngineLoop(self.engine, self.commands, self, sys.maxsize).run()
        finally:
            self.commands.close()
            self._report(("closed",))

    # ---- EngineLoop's sink, called from the loop thread -------------------------------------
    def _report(self, message: tuple) -> None:
        self._event_loop.call_soon_threadsafe(self.reports.put_nowait, message)

    def admitted(self, group_id: int, error: Exception | None) -> None:
        self._report(("admitted", group_id, error))

    def outputs(self, outputs, stats) -> None:
        self._report(("outputs", outputs, stats))

    def publish(self, stats) -> None:
        self._report(("stats", stats))


class RayEngine:
    """The pool's handle on one replica actor, placed in a placement group of its own."""

    def __init__(self, index: int, build: Callable[[], object], bundle: dict[str, float],
                 num_threads: int | None = None, max_restarts: int = -1) -> None:
        self.index, self.build, self.bundle = index, build, bundle
        self.num_threads, self.max_restarts = num_threads, max_restarts
        self.actor = None
        self.placement = None
        self.pid: int | None = None
        self.error: BaseException | None = None
        self._events = None

    def launch(self) -> None:
        """Create the actor; after a death Ray restarts it (max_restarts), so there is nothing to do."""
        if self.actor is not None:
            return
        ray = import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.placement = placement_group([self.bundle], strategy="STRICT_PACK")
        self.actor = ray.remote(ReplicaActor).options(
            num_cpus=self.bundle.get("CPU", 0), num_gpus=self.bundle.get("GPU", 0), max_restarts=self.max_restarts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=0),
        ).remote(self.build, self.num_threads)

    def wait_ready(self, timeout: float) -> dict:
        """The engine's info once the actor (new or restarted) answers; RuntimeError when it cannot."""
        ray = import_ray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    info = ray.get(self.actor.hello.remote(), timeout=max(0.0, deadline - time.monotonic()))
                    break
                except ray.exceptions.ActorUnavailableError:
                    # Ray refuses calls while it restarts the actor; ask again until it is back.
                    if time.monotonic() > deadline:
                        raise ray.exceptions.GetTimeoutError() from None
                    time.sleep(0.1)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"replica {self.index} did not start within {timeout} s; does the Ray cluster "
                               f"have {self.bundle} free for it? (`ray status` shows what is free)") from None
        except ray.exceptions.RayError as exc:
            raise RuntimeError(f"replica {self.index} failed to start: {exc}") from None
        self.pid, self.error = info["pid"], None
        self._events = self.actor.events.remote()
        return info

    def send(self, command: Command) -> bool:
        # Fire and forget: a dead actor shows in receive(); Ray queues calls while it restarts.
        self.actor.send.remote(command)
        return True

    def receive(self) -> Iterator[tuple]:
        """The actor's reports until it stops or dies."""
        ray = import_ray()
        try:
            for ref in self._events:
                yield from ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.error = exc

    def exit_reason(self) -> str:
        return "its Ray actor stopped" if self.error is None else f"its Ray actor died: {type(self.error).__name__}"

    def join(self, timeout: float | None) -> None:
        """Wait for the loop to stop (after Close), then remove the actor and its placement group."""
        if self.actor is None:
            return
        ray = import_ray()
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get(self.actor.join.remote(), timeout=timeout)
        except ray.exceptions.RayError as exc:  # timed out or already dead: kill it below either way
            log.warning("replica %d did not stop cleanly: %s", self.index, exc)
        ray.kill(self.actor, no_restart=True)
        remove_placement_group(self.placement)


def replica_bundle(device_type: str, tensor_parallel_size: int, cluster_cpus: float, replicas: int) -> dict:
    """Resources one replica reserves: its GPUs (one per tensor-parallel rank) and a core on a
    device; an even share of the cluster's cores on the cpu."""
    if device_type == "cpu":
        return {"CPU": max(1, int(cluster_cpus) // replicas)}
    return {"CPU": 1, "GPU": tensor_parallel_size}


def connect(address: str | None) -> None:
    """Join the Ray cluster at address ("auto": the one running here); None or "local" starts one."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address)


def ray_engines(model, backend: str | None, config: EngineConfig, replicas: int, address: str | None,
                max_restarts: int = -1) -> Callable[[int], RayEngine]:
    """A handle factory for ReplicaPool: replicas of `model` as actors on the cluster at `address`."""
    connect(address)
    ray = import_ray()
    resources = ray.cluster_resources()
    if backend in (None, "auto") and resources.get("GPU", 0) > 0:
        device_type = "cuda"  # the front end's node may have no GPU; the cluster's decide
    else:
        device_type = backend_class(backend).device_type()
    bundle = replica_bundle(device_type, config.tensor_parallel_size, resources.get("CPU", 1), replicas)
    threads = int(bundle["CPU"]) if device_type == "cpu" else None
    # Ray gives each actor only its own GPUs (CUDA_VISIBLE_DEVICES), so device 0 is always its first.
    build = functools.partial(_build_engine, model, backend, config)
    return lambda index: RayEngine(index, build, bundle, threads, max_restarts)


def _build_engine(model, backend, config):
    from splitfuse.assembly import build_engine

    return build_engine(model, backend, config, 0)
