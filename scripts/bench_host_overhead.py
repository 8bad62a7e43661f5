"""Host work per engine step: where a step's time goes besides the model's matmuls.

Builds an engine on the embedded demo model (cpu backend), fills it with N running sequences and
times each decode step by phase: scheduler, build_batch, backend metadata prep, forward (its
matmuls and each other backend op apart), lm_head + logits, the sampling setup and sampling, and
the post-step bookkeeping (Scheduler.apply, with the detokenizer inside it, then the outputs
Engine._apply builds). Phases are timed by wrapping the engine's collaborators in this script;
the engine itself carries no instrumentation.

The batch builder before it was vectorised is kept below (`reference_build_batch`) and the two
run side by side: decode rounds alternate between them on the same engine, and every mixed step
of the fill (prompt chunks next to decodes) is built by both, checked equal, and timed.

    python scripts/bench_host_overhead.py [--seqs 32 256] [--steps 20] [--rounds 3] [--threads 2]
                                          [--dtype float32|bfloat16] [--host-only-steps 60]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict

import torch

from bench_scheduler import cpu_model
from splitfuse.assembly import build_engine
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core import engine as engine_mod
from splitfuse.core.batch import BatchMeta, build_batch
from splitfuse.core.detokenizer import IncrementalDetokenizer
from splitfuse.core.scheduler import StepPlan
from splitfuse.data import default_model_dir

PHASES = ("scheduler.schedule", "build_batch", "backend.prepare_batch", "forward (all)",
          "lm_head + logits", "sampling setup", "backend.sample", "Scheduler.apply", "outputs", "rest of step")
NESTED = {"forward: matmuls": "inside forward", "logits: lm_head matmul": "inside lm_head + logits",
          "apply: detokenize": "inside Scheduler.apply"}
# the backend ops of the forward besides its matmuls, each timed with its Python wrapper
FORWARD_OPS = ("embedding", "rms_norm", "rotary_write_kv", "paged_attention", "silu_and_mul")
NESTED.update({f"forward: {op}": "inside forward" for op in FORWARD_OPS})
NESTED["forward: the rest"] = "inside forward: model code between the ops"


def reference_build_batch(plan: StepPlan, block_size: int, tables=None) -> BatchMeta:
    """build_batch as it was before vectorising: Python lists per token, one nested list of padded
    block tables per step (`tables` is ignored: nothing is kept between steps)."""
    input_ids: list[int] = []
    positions: list[int] = []
    token_seq: list[int] = []
    query_start = [0]
    context_lens: list[int] = []
    sample_index: list[int] = []
    rows: list[list[int]] = []
    max_query_len = 0
    for seq_idx, item in enumerate(plan.items):
        seq = item.sequence
        start = seq.num_computed
        end = start + item.num_tokens
        input_ids += seq.token_ids[start:end]
        positions += range(start, end)
        token_seq += [seq_idx] * item.num_tokens
        query_start.append(len(input_ids))
        context_lens.append(end)
        rows.append(seq.block_table)
        max_query_len = max(max_query_len, item.num_tokens)
        if item.samples:
            sample_index.append(len(input_ids) - 1)
    max_blocks = max(len(t) for t in rows)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in rows], dtype=torch.int32)
    positions_t = torch.tensor(positions, dtype=torch.int64)
    token_seq_t = torch.tensor(token_seq, dtype=torch.int64)
    blocks = block_tables[token_seq_t, positions_t // block_size].to(torch.int64)
    return BatchMeta(
        input_ids=torch.tensor(input_ids, dtype=torch.int64), positions=positions_t,
        query_start=torch.tensor(query_start, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32), block_tables=block_tables,
        slot_mapping=blocks * block_size + positions_t % block_size, token_seq=token_seq_t,
        sample_index=torch.tensor(sample_index, dtype=torch.int64), num_tokens=len(input_ids),
        num_seqs=len(rows), max_query_len=max_query_len, max_context_len=max(context_lens),
        block_size=block_size, is_decode_only=max_query_len == 1, query_start_host=query_start,
        context_lens_host=context_lens,
        seq_lens=torch.tensor([len(item.sequence.token_ids) for item in plan.items], dtype=torch.int32),
    )


BUILDERS = {"before": reference_build_batch, "now": build_batch}


class PhaseTimer:
    """Wraps the engine's collaborators with perf_counter; `times` sums seconds per phase in the
    current step, `steps` keeps one such dict per finished step."""

    def __init__(self, eng) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)  # per label, counted from the first timed step
        self.builder = "now"
        self.mixed: dict[str, list[float]] = defaultdict(list)  # build_batch µs on mixed steps
        self.compare_mixed = False
        self._wrap(eng.scheduler, "schedule", "scheduler.schedule")
        self._wrap(eng.backend, "prepare_batch", "backend.prepare_batch")
        self._wrap(eng.backend, "forward", "forward (all)")
        self._wrap(eng, "_logits", "lm_head + logits")
        self._wrap(eng.backend, "sample", "backend.sample")
        self._wrap(eng.scheduler, "apply", "Scheduler.apply")
        self._wrap(eng, "_sampling_batch", "sampling setup")
        self._wrap(eng, "_apply", "Engine._apply")  # its part besides Scheduler.apply: "outputs"
        self._detokenizer_add = IncrementalDetokenizer.add  # a class attribute: put back by close()
        self._wrap(IncrementalDetokenizer, "add", "apply: detokenize")
        linear = eng.backend.linear
        lm_head = [False]

        def timed_logits(*args, _inner=eng._logits, **kwargs):
            lm_head[0] = True
            try:
                return _inner(*args, **kwargs)
            finally:
                lm_head[0] = False

        def timed_linear(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return linear(*args, **kwargs)
            finally:
                self.times["logits: lm_head matmul" if lm_head[0] else "forward: matmuls"] += time.perf_counter() - t0

        eng._logits = timed_logits
        eng.backend.linear = timed_linear
        for op in FORWARD_OPS:
            self._wrap(eng.backend, op, f"forward: {op}")
        engine_mod.build_batch = self._build_batch

    def close(self) -> None:
        """Undo the wraps that outlive this engine (module and class attributes)."""
        IncrementalDetokenizer.add = self._detokenizer_add
        engine_mod.build_batch = build_batch

    def _wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)
        times, calls = self.times, self.calls

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                times[label] += time.perf_counter() - t0
                calls[label] += 1

        setattr(owner, name, timed)

    def _build_batch(self, plan: StepPlan, block_size: int, tables=None) -> BatchMeta:
        if self.compare_mixed and not all(item.num_tokens == 1 for item in plan.items):
            metas = {}
            for name in ("before", "now"):  # the same plan through both, timed apart
                t0 = time.perf_counter()
                metas[name] = BUILDERS[name](plan, block_size, tables)
                self.mixed[name].append((time.perf_counter() - t0) * 1e6)
            check_equal(metas["before"], metas["now"])
            return metas["now"]
        t0 = time.perf_counter()
        try:
            return BUILDERS[self.builder](plan, block_size, tables)
        finally:
            self.times["build_batch"] += time.perf_counter() - t0

    def step(self, eng) -> dict[str, float]:
        """Run one engine step; returns µs per phase (the whole step under "step")."""
        self.times.clear()
        t0 = time.perf_counter()
        eng.step()
        total = time.perf_counter() - t0
        us = {label: seconds * 1e6 for label, seconds in self.times.items()}
        us["step"] = total * 1e6
        us["outputs"] = us.get("Engine._apply", 0.0) - us.get("Scheduler.apply", 0.0)
        us["rest of step"] = us["step"] - sum(us.get(label, 0.0) for label in PHASES[:-1])
        us["matmuls"] = us.get("forward: matmuls", 0.0) + us.get("logits: lm_head matmul", 0.0)
        us["forward: the rest"] = us.get("forward (all)", 0.0) - sum(
            us.get(label, 0.0) for label in ("forward: matmuls", *(f"forward: {op}" for op in FORWARD_OPS)))
        return us


def check_equal(a: BatchMeta, b: BatchMeta) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        same = torch.equal(value, other) and value.dtype == other.dtype if isinstance(value, torch.Tensor) \
            else name == "step_cache" or value == other
        if not same:
            raise RuntimeError(f"the builders disagree on {name}: {value} vs {other}")


def run(num_seqs: int, args) -> None:
    rng = random.Random(args.seed)
    # the first sequences admitted decode while the others' prompts are filled in
    fill_steps = -(-num_seqs * args.prompt_len // max(args.token_budget, num_seqs)) + 2
    host_steps = args.host_only_steps
    longest = args.prompt_len + fill_steps + args.rounds * 2 * args.steps + host_steps + 2  # KV for all: no preemption
    config = EngineConfig(token_budget=max(args.token_budget, num_seqs), max_seqs=num_seqs, dtype=args.dtype,
                          num_kv_blocks=num_seqs * -(-longest // 16) + 16, kv_block_size=16)
    eng = build_engine(default_model_dir(), backend="cpu", config=config)
    vocab = eng.model.vocab_size
    params = SamplingParams(temperature=0.0, max_new_tokens=longest, ignore_eos=True)
    for _ in range(num_seqs):
        eng.add_request([rng.randrange(3, vocab) for _ in range(args.prompt_len)], params)
    timer = PhaseTimer(eng)
    timer.compare_mixed = True
    while eng.num_waiting or any(seq.num_uncomputed > 1 for seq in eng.scheduler.running):
        eng.step()  # the fill: prompt chunks next to the first decodes
    timer.compare_mixed = False
    timer.calls.clear()
    per_step: dict[str, list[dict[str, float]]] = {"before": [], "now": []}
    for _ in range(args.rounds):
        for name in ("before", "now"):  # alternate, so both see the same contexts and machine load
            timer.builder = name
            per_step[name] += [timer.step(eng) for _ in range(args.steps)]
    if len(eng.scheduler.running) != num_seqs:
        raise RuntimeError("benchmark setup is wrong: every sequence should decode in every timed step")

    def median(name: str, label: str) -> float:
        return statistics.median(step.get(label, 0.0) for step in per_step[name])

    print(f"\n#### {num_seqs} decoding sequences (prompts of {args.prompt_len}, "
          f"{args.rounds}x{args.steps} decode steps per builder, medians in µs per step)\n")
    print("| phase | before | now | now / before |")
    print("|---|---:|---:|---:|")
    for label in PHASES + tuple(NESTED) + ("matmuls", "step"):
        before, now = median("before", label), median("now", label)
        shown = f"{label} ({NESTED[label]})" if label in NESTED else label
        print(f"| {shown} | {before:.0f} | {now:.0f} | {now / before if before else float('nan'):.2f} |")
    for name in ("before", "now"):
        ratios = [step["step"] / step["matmuls"] for step in per_step[name]]
        print(f"\nstep time / matmul time, {name}: {statistics.median(ratios):.2f}")
    steps = per_step["before"] + per_step["now"]  # the forward is the same code in both
    print("\nforward ops, every timed step (calls per step, µs per call, µs per step):\n")
    print("| op | calls | µs per call | µs per step |")
    print("|---|---:|---:|---:|")
    for op in FORWARD_OPS:
        per_step_us = statistics.median(step.get(f"forward: {op}", 0.0) for step in steps)
        calls = timer.calls[f"forward: {op}"] // len(steps)
        print(f"| {op} | {calls} | {per_step_us / max(calls, 1):.1f} | {per_step_us:.0f} |")
    if timer.mixed["now"]:
        before, now = statistics.median(timer.mixed["before"]), statistics.median(timer.mixed["now"])
        print(f"build_batch on the {len(timer.mixed['now'])} mixed steps of the fill (same plans, outputs checked "
              f"equal): before {before:.0f} µs, now {now:.0f} µs, now / before {now / before:.2f}")
    if host_steps:
        host_work_alone(eng, timer, host_steps, args.seed)
    timer.close()


def host_work_alone(eng, timer: PhaseTimer, num_steps: int, seed: int) -> None:
    """Steps with the forward, lm_head and sampler replaced by stand-ins that cost next to nothing
    (random tokens, so the detokenizer sees varied text): what is left is the step's host work,
    also timed in this thread's CPU time, which other jobs on the machine disturb less."""
    hidden = torch.zeros(eng.scheduler.token_budget, eng.model.hidden_size, dtype=eng.model.dtype)
    logits = torch.zeros(eng.scheduler.max_seqs, eng.model.vocab_size)
    draws = torch.Generator().manual_seed(seed)
    vocab = eng.model.vocab_size
    eng.backend.forward = lambda model, meta, kv_cache: hidden[:meta.num_tokens]
    eng.model.logits = lambda rows: logits[:rows.shape[0]]
    eng.backend.sample = lambda rows, batch: torch.randint(3, vocab, (rows.shape[0],), generator=draws)
    for owner, name, label in ((eng.backend, "forward", "forward (all)"), (eng.backend, "sample", "backend.sample")):
        timer._wrap(owner, name, label)
    timer.builder = "now"
    steps, cpu = [], []
    for _ in range(num_steps):
        t0 = time.thread_time()
        steps.append(timer.step(eng))
        cpu.append((time.thread_time() - t0) * 1e6)
    print(f"\nHost work alone ({num_steps} decode steps, forward / lm_head / sampler stubbed, medians in µs):\n")
    print("| phase | µs |")
    print("|---|---:|")
    for label in PHASES + ("apply: detokenize", "step"):
        print(f"| {label} | {statistics.median(step.get(label, 0.0) for step in steps):.0f} |")
    print(f"| step, thread CPU time | {statistics.median(cpu):.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--token-budget", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per builder per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--host-only-steps", type=int, default=0,
                        help="then time this many steps with the forward, lm_head and sampler stubbed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"### Host work per step ({datetime.date.today().isoformat()})\n")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} torch thread(s); "
          f"Python {platform.python_version()}, torch {torch.__version__}; demo model, cpu backend, {args.dtype}")
    for num_seqs in args.seqs:
        run(num_seqs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
