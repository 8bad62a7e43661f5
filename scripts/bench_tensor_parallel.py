#!/usr/bin/env python
"""cpu tensor parallelism: step times of one random-weight Llama over 2 ranks against 1 rank, side
by side, and each step's communication time measured inside the ranks.

The model is 0.5B-shaped (Qwen2.5-0.5B's layers: hidden 896, 24 layers, 14 heads / 2 KV heads,
intermediate 4864) with a 32000-token vocabulary; `--layers` takes fewer layers. Every rank is a
process bound to one core of its own (os.sched_setaffinity) with one torch thread, and makes the
same random weights (scripts/gpu_bench.py's generator), keeping only its slices. Rank 0 schedules
the steps as the engine does and broadcasts each step's metadata; the other ranks run what they
receive. Communication = the metadata broadcast, the all-reduces (two per layer, one for the
embedding) and the gather of the logits.

    python scripts/bench_tensor_parallel.py                  # 24 layers
    python scripts/bench_tensor_parallel.py --layers 2       # a quick run
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import time

from splitfuse.parallel.shard import Shard

MAX_MODEL_LEN = 512


class TimedShard(Shard):
    """A Shard whose collectives add their time to `comm_s` (reset each step)."""

    comm_s = 0.0

    @classmethod
    def timed(cls, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            cls.comm_s += time.perf_counter() - start

    def all_reduce(self, x):
        return x if self.size == 1 else self.timed(super().all_reduce, x)

    def gather_last_dim(self, x):
        return x if self.size == 1 else self.timed(super().gather_last_dim, x)


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                       num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=MAX_MODEL_LEN,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def run_rank(rank: int, size: int, args, port: int, results) -> None:
    """One rank's process: its core, its shard, the steps; puts (rank, [(tokens, step s, comm s)])."""
    os.sched_setaffinity(0, {args.first_core + rank % (os.cpu_count() or 1)})
    import torch
    import torch.distributed as dist
    from gpu_bench import random_weights  # scripts/ is on sys.path when this file is run

    from splitfuse.backends.selection import create_backend
    from splitfuse.models.llama import LlamaForCausalLM

    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    shard = TimedShard(rank, size)
    backend = create_backend("cpu")
    hf_config = llama_config(args.layers)
    model = LlamaForCausalLM(hf_config, backend, torch.float32, MAX_MODEL_LEN)
    model.set_shard(shard)
    model.load_weights(_sliced(model, random_weights(hf_config, backend.device, torch.float32)))
    kv_cache = backend.allocate_kv_cache(model.num_layers, args.num_blocks, 16, model.num_kv_heads, model.head_dim,
                                         model.dtype)
    steps = _steps(rank, size, args, model, backend, kv_cache)
    results.put((rank, steps))
    if size > 1:
        dist.destroy_process_group()


def _sliced(model, named_tensors):
    for name, tensor in named_tensors:
        slices = model.checkpoint_slice(name, list(tensor.shape))
        yield name, tensor if slices is None else slices.read(tensor).contiguous()


def _steps(rank, size, args, model, backend, kv_cache) -> list[tuple[int, float, float]]:
    """Rank 0 schedules (and broadcasts) `args.steps` steps of `args.seqs` prompts of
    `args.prompt_len` tokens; others receive them. Each step: (tokens, seconds, seconds communicating)."""
    from splitfuse.config import SamplingParams
    from splitfuse.core.batch import build_batch
    from splitfuse.core.kv_blocks import BlockManager
    from splitfuse.core.request import Sequence
    from splitfuse.core.scheduler import Scheduler
    from splitfuse.parallel.step_meta import broadcast_step, receive_step

    scheduler = Scheduler(token_budget=args.token_budget, max_seqs=args.seqs, blocks=BlockManager(args.num_blocks, 16))
    for i in range(args.seqs):
        prompt = [(7 * i + j) % 31000 + 3 for j in range(args.prompt_len)]
        scheduler.add(Sequence(str(i), prompt, SamplingParams(max_new_tokens=10_000, ignore_eos=True), arrival=i,
                               max_len=MAX_MODEL_LEN))
    out = []
    for _ in range(args.steps):
        TimedShard.comm_s = 0.0
        start = time.perf_counter()
        if rank == 0:
            plan = scheduler.schedule()
            meta = build_batch(plan, 16)
            if size > 1:
                TimedShard.timed(broadcast_step, meta)
        else:
            meta = TimedShard.timed(receive_step)
        meta = backend.prepare_batch(meta)
        hidden = backend.forward(model, meta, kv_cache)
        model.logits(hidden[meta.sample_index])
        if rank == 0:  # the sampled token does not change the time of a step: any will do
            scheduler.apply(plan, [5] * meta.sample_index.numel())
        out.append((meta.num_tokens, time.perf_counter() - start, TimedShard.comm_s))
    return out


def measure(size: int, args) -> dict[int, list[tuple[int, float, float]]]:
    """Run `size` ranks, one process each; their step records by rank."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [context.Process(target=run_rank, args=(r, size, args, port, results)) for r in range(size)]
    for process in ranks:
        process.start()
    records = dict(results.get(timeout=3600) for _ in ranks)
    for process in ranks:
        process.join()
        if process.exitcode:
            raise SystemExit(f"rank process exited with code {process.exitcode}")
    return records


def summary(records, seqs: int, kind: str) -> tuple[float, float]:
    """Median step seconds (the slowest rank's) and median communication seconds (the mean over
    ranks) of one kind of step: 'prefill' (more tokens than sequences) or 'decode' (one each)."""
    steps = list(zip(*records.values()))[1:]  # per step, every rank's record; the first is a warm-up
    chosen = [s for s in steps if (s[0][0] > seqs) == (kind == "prefill")]
    if not chosen:
        return float("nan"), float("nan")
    # medians: a shared machine's stalls move the mean, not the median
    step = statistics.median(max(r[1] for r in s) for s in chosen)
    comm = statistics.median(statistics.mean(r[2] for r in s) for s in chosen)
    return step, comm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (the 0.5B shape has 24)")
    parser.add_argument("--seqs", type=int, default=8, help="sequences decoding together")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=128, help="tokens per step (prefill steps fill it)")
    parser.add_argument("--steps", type=int, default=24, help="steps timed per rank count (the first is a warm-up)")
    parser.add_argument("--num-blocks", type=int, default=256, help="KV blocks of 16 tokens")
    parser.add_argument("--first-core", type=int, default=0, help="rank r runs on core first_core + r")
    args = parser.parse_args(argv)
    print(f"cpu, {os.cpu_count()} cores, one core and one thread per rank; Llama 0.5B-shaped, {args.layers} layers; "
          f"{args.seqs} sequences of {args.prompt_len}-token prompts, {args.token_budget} tokens per step")
    table = {size: measure(size, args) for size in (1, 2)}
    print(f"{'step':<22}{'TP=1 ms':>10}{'TP=2 ms':>10}{'TP=2 / TP=1':>13}{'TP=2 comm ms':>14}{'comm share':>12}")
    for kind, label in (("prefill", f"prefill ({args.token_budget} tok)"), ("decode", f"decode ({args.seqs} seqs)")):
        one, _ = summary(table[1], args.seqs, kind)
        two, comm = summary(table[2], args.seqs, kind)
        print(f"{label:<22}{one * 1e3:>10.1f}{two * 1e3:>10.1f}{two / one:>13.2f}{comm * 1e3:>14.1f}"
              f"{comm / two:>12.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
