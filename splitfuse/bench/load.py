"""Load drivers: closed loop with N concurrent clients (FastGen) and open loop with Poisson arrivals (vLLM)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import numpy as np
from tqdm import tqdm

from splitfuse.bench.metrics import RequestRecord
from splitfuse.bench.workloads import BenchRequest


class System(Protocol):
    """Something that serves benchmark requests: a server client or an in-process baseline."""

    name: str

    async def start(self) -> None: ...

    async def send(self, request: BenchRequest) -> RequestRecord: ...

    def set_concurrency(self, clients: int) -> None: ...

    async def close(self) -> None: ...


async def closed_loop(system: System, requests: list[BenchRequest], clients: int,
                      progress: tqdm | None = None) -> tuple[list[RequestRecord], float]:
    """N clients, each sending its next request as soon as its previous one finished.
    Returns the records in workload order and the duration from the first send to the last token."""
    if clients < 1:
        raise ValueError(f"--clients values must be at least 1, got {clients}")
    system.set_concurrency(clients)
    records: list[RequestRecord | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))

    async def client() -> None:
        for i in next_index:
            records[i] = await system.send(requests[i])
            if progress is not None:
                progress.update(1)

    begin = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(clients, len(requests)))))
    return records, _duration(records, begin)


async def open_loop(system: System, requests: list[BenchRequest], rate: float, seed: int,
                    progress: tqdm | None = None) -> tuple[list[RequestRecord], float]:
    """Requests sent at Poisson arrival times (exponential gaps with mean 1 / rate s), seeded."""
    if rate <= 0:
        raise ValueError(f"--rate values must be positive, got {rate}")
    system.set_concurrency(len(requests))
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(requests))
    arrivals = np.cumsum(gaps) - gaps[0]  # the first request goes at once

    begin = time.perf_counter()

    async def one(i: int) -> RequestRecord:
        delay = begin + arrivals[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = await system.send(requests[i])
        if progress is not None:
            progress.update(1)
        return record

    records = await asyncio.gather(*(one(i) for i in range(len(requests))))
    return list(records), _duration(records, begin)


def _duration(records, begin: float) -> float:
    ends = [r.token_times[-1] for r in records if r is not None and r.token_times]
    return (max(ends) if ends else time.perf_counter()) - begin
