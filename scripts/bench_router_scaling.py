"""How far one front end scales: requests/s and the router's added latency at 1..16 Ray replicas.

Each replica is a Ray actor holding a simulated engine: the real Scheduler and BlockManager
(splitfuse.testing.sim.Simulator) with the forward pass replaced by a sleep modelled on measured cpu
step costs (docs/benchmarks.md: a decode step of a few sequences 8 ms, a step with 512 prompt tokens
about 26 ms, so 8 ms + 35 us per token). Replicas therefore cost no CPU, and what limits the curve
is the one front-end process: the router (ReplicaPool), Ray's transport, and the asyncio clients
that share its event loop (HTTP parsing is left out). Closed-loop clients, 2 x max_seqs per replica,
send requests of 64 prompt tokens and 16 new ones for --seconds at each replica count.

Added latency per request = what the client saw (submit -> last output) - what the engine spent on it
(queued -> finished, measured inside the actor): the router, the Ray calls and the event loop.

    python scripts/bench_router_scaling.py [--replicas 1 2 4 8 16] [--seconds 5] [--plot docs/img/router_scaling.png]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import statistics
import time

from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core.engine import EngineSettings, EngineStats
from splitfuse.core.request import RequestOutput
from splitfuse.testing.sim import Simulator

PROMPT_LEN, NEW_TOKENS = 64, 16


class SimEngine:
    """The Engine interface EngineLoop uses, over the model-free Simulator; a step sleeps as a cpu
    forward pass of that many tokens would take. The last output's text is the engine-side seconds."""

    def __init__(self, max_seqs: int, step_base_s: float = 0.008, step_per_token_s: float = 35e-6) -> None:
        self.sim = Simulator(token_budget=512, max_seqs=max_seqs, num_blocks=4096, block_size=16)
        self.step_base_s, self.step_per_token_s = step_base_s, step_per_token_s
        self.seqs, self.started = {}, {}
        self.tokenizer, self.sampling_defaults, self.max_model_len = None, {}, 4096
        self.settings = EngineSettings(16, 4096, 4096, "float32", "simulated cpu")

    parallel = None  # one process, no tensor-parallel ranks

    @property
    def scheduler(self):  # the queue limits read its queues, as they read a real engine's
        return self.sim.scheduler

    @property
    def blocks(self):
        return self.sim.blocks

    def add_requests(self, requests) -> list[str]:
        for ids, params, rid in requests:
            self.seqs[rid] = self.sim.add_request(len(ids), params.max_new_tokens, rid)
            self.started[rid] = time.perf_counter()
        return [rid for _, _, rid in requests]

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.sim.abort(seq)
        return seq is not None

    def abort_all(self) -> list[str]:
        ids = list(self.seqs)
        for rid in ids:
            self.abort(rid)
        return ids

    def has_unfinished(self) -> bool:
        return self.sim.has_unfinished

    @property
    def num_waiting(self) -> int:
        return len(self.sim.scheduler.waiting)

    def stats(self) -> EngineStats:
        blocks = self.sim.blocks
        return EngineStats(running=len(self.sim.scheduler.running), waiting=self.num_waiting,
                           kv_blocks_used=blocks.num_used, kv_blocks_free=blocks.num_free,
                           kv_blocks_total=blocks.num_blocks, steps=self.sim.num_steps)

    def step(self) -> list[RequestOutput]:
        plan = self.sim.schedule()
        time.sleep(self.step_base_s + self.step_per_token_s * plan.num_tokens)
        done = set(id(seq) for seq in self.sim.complete(plan))
        outputs = []
        for item in plan.items:
            if not item.samples:
                continue
            rid, finished = item.sequence.request_id, id(item.sequence) in done
            text = ""
            if finished:
                self.seqs.pop(rid, None)
                text = f"{time.perf_counter() - self.started.pop(rid):.6f}"
            outputs.append(RequestOutput(rid, [self.sim.sampled[rid][-1]], text, finished,
                                         "length" if finished else None))
        return outputs


def run_point(replicas: int, max_seqs: int, seconds: float) -> dict:
    """Start `replicas` simulated Ray replicas behind one pool, load them for `seconds`, stop them."""
    from splitfuse.serving.ray_replicas import RayEngine
    from splitfuse.serving.replicas import ReplicaPool

    build = lambda: SimEngine(max_seqs)  # noqa: E731 - pickled by value into each actor
    pool = ReplicaPool(None, "cpu", EngineConfig(), replicas, max_waiting=1 << 30,
                       engines=lambda index: RayEngine(index, build, {"CPU": 0.01}))
    latencies, added = [], []

    async def client(deadline: float) -> None:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            async for out in pool.generate(list(range(PROMPT_LEN)), params):
                last = out
            latency = time.perf_counter() - start
            latencies.append(latency)
            added.append(latency - float(last.new_text))

    async def load() -> float:
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        await asyncio.gather(*(client(deadline) for _ in range(2 * max_seqs * replicas)))
        return time.perf_counter() - start

    try:
        asyncio.run(load_warm(pool))
        elapsed = asyncio.run(load())
    finally:
        pool.close(drain=False, timeout=10)
    return {"replicas": replicas, "requests_per_s": len(latencies) / elapsed,
            "latency_p50_ms": 1000 * statistics.median(latencies),
            "added_p50_ms": 1000 * statistics.median(added),
            "added_p90_ms": 1000 * statistics.quantiles(added, n=10)[-1]}


async def load_warm(pool) -> None:
    """One request per replica first, so actor start-up is not timed."""
    params = SamplingParams(max_new_tokens=1, temperature=0.0)

    async def one():
        async for _ in pool.generate([1], params):
            pass

    await asyncio.gather(*(one() for _ in pool.replicas))


def saturation(points: list[dict], efficiency: float = 0.8) -> int | None:
    """The first replica count whose requests/s fall below `efficiency` x linear scaling from the first point."""
    base = points[0]["requests_per_s"] / points[0]["replicas"]
    for point in points:
        if point["requests_per_s"] < efficiency * base * point["replicas"]:
            return point["replicas"]
    return None


def plot(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [p["replicas"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(counts, [p["requests_per_s"] for p in points], "o-", label="measured")
    base = points[0]["requests_per_s"] / counts[0]
    left.plot(counts, [base * c for c in counts], "--", color="grey", label="linear")
    left.set(xscale="log", yscale="log", xlabel="Ray replicas", ylabel="requests/s", title="one front end")
    left.set_xticks(counts, [str(c) for c in counts])
    left.legend()
    right.plot(counts, [p["added_p50_ms"] for p in points], "o-", label="p50")
    right.plot(counts, [p["added_p90_ms"] for p in points], "s-", label="p90")
    right.set(xscale="log", xlabel="Ray replicas", ylabel="ms per request", title="router's added latency")
    right.set_xticks(counts, [str(c) for c in counts])
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-seqs", type=int, default=16, help="sequences each simulated engine batches")
    parser.add_argument("--seconds", type=float, default=5.0, help="load time at each replica count")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--plot", default=None, help="write the figure here (PNG)")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    points = []
    for replicas in args.replicas:
        points.append(run_point(replicas, args.max_seqs, args.seconds))
        print(points[-1], flush=True)
    ray.shutdown()
    knee = saturation(points)
    print(f"\n{datetime.date.today()}, {args.seconds:g} s per point, max_seqs={args.max_seqs}\n")
    print("| Ray replicas | requests/s | x one replica | added latency p50 / p90 (ms) |")
    print("|---|---|---|---|")
    for p in points:
        ratio = p["requests_per_s"] / points[0]["requests_per_s"]
        print(f"| {p['replicas']} | {p['requests_per_s']:.0f} | {ratio:.2f} "
              f"| {p['added_p50_ms']:.1f} / {p['added_p90_ms']:.1f} |")
    print(f"\nsaturation (below 80% of linear): {knee or 'not reached'} replicas")
    if args.plot:
        plot(points, args.plot)
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
