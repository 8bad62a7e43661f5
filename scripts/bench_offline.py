#!/usr/bin/env python
"""Offline throughput on the CPU: splitfuse vs Hugging Face transformers `generate`, side by side.

Both run in this process on the same tiny random Llama (built once into a temp dir) and the same
workload: N prompts of random lengths (fixed seed, random ids that avoid the special ids 0-2),
each generating exactly --new-tokens tokens.

  (a) splitfuse, backend "cpu" (--backend; several comma-separated are timed side by side):
      all prompts in one pipe() call, ignore_eos, greedy, default
      engine config (token_budget 768) unless --token-budget says otherwise;
  (b) transformers: model.generate, fp32, greedy, min_new_tokens = max_new_tokens, static
      batches of --hf-batch prompts in arrival order, left padded (pad id 0, attention_mask).

Each side is warmed up once with a small run, then the whole workload is timed --repeats times,
the two engines interleaved (sf, hf, sf, hf, ...) so that load from other processes hits both
alike. The headline is the best run (least disturbed), the median is printed beside it, and so
is process CPU time. Then a sanity check: splitfuse's greedy tokens for the first --check
prompts must equal HF's unpadded batch-1 generate (left padding shifts HF's numerics slightly,
so the padded batches are only compared for information). Exit status 1 if the check fails.

The final block is Markdown, ready to paste into docs/benchmarks.md. On a shared machine, run it
when nothing else is busy: with 2 threads, a single competing process can slow torch's OpenMP
barriers by 10x or more.

    python scripts/bench_offline.py                        # 32 prompts, 32 new tokens, 5 repeats
    python scripts/bench_offline.py --threads 1
    python scripts/bench_offline.py --backend cpu,cpu-native  # + a plugin backend, side by side
    python scripts/bench_offline.py --breakdown            # + where splitfuse's time goes, per stage
    python scripts/bench_offline.py --profile /tmp/sf.prof # + cProfile of one splitfuse run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import splitfuse
from splitfuse.testing.tiny_model import make_tiny_model

# The benchmark model: a tiny random Llama, big enough that matmuls are not free.
MODEL_KWARGS = dict(
    arch="llama", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4, intermediate_size=512,
    vocab_size=512, max_position_embeddings=2048, seed=0,
)
FIRST_REGULAR_ID = 3  # ids 0, 1, 2 are <unk>/pad, <s>, </s>
PAD_ID = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32, help="number of prompts (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--min-len", type=int, default=32, help="shortest prompt (default 32)")
    p.add_argument("--max-len", type=int, default=160, help="longest prompt (default 160)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per engine (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--hf-batch", type=int, default=8, help="HF static batch size (default 8)")
    p.add_argument("--token-budget", type=int, default=None, help="splitfuse token_budget (default: engine's, 768)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--check", type=int, default=4, help="prompts compared with HF batch-1 generate (default 4)")
    p.add_argument("--model-dir", type=Path, default=None, help="use this model instead of building the tiny Llama")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations of both engines (default float32)")
    p.add_argument("--backend", default="cpu",
                   help="splitfuse backend, or several comma-separated (cpu,cpu-native) timed side by side (default cpu)")
    p.add_argument("--skip-hf", action="store_true", help="time splitfuse only")
    p.add_argument("--breakdown", action="store_true",
                   help="after timing, time splitfuse's stages (model ops, batch building, sampling, ...) per run")
    p.add_argument("--profile", type=Path, default=None,
                   help="after timing, cProfile one splitfuse run and write the stats here (also prints the top)")
    return p.parse_args(argv)


# ---- workload ------------------------------------------------------------------------------------
def make_prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(FIRST_REGULAR_ID, vocab, (length,), generator=gen).tolist() for length in lengths]


# ---- splitfuse -----------------------------------------------------------------------------------
def run_splitfuse(pipe, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    responses = pipe(prompts, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out = [r.token_ids for r in responses]
    bad = [i for i, toks in enumerate(out) if len(toks) != new_tokens]
    if bad:
        raise RuntimeError(f"splitfuse: prompts {bad[:5]} did not generate exactly {new_tokens} tokens")
    return out


# ---- transformers --------------------------------------------------------------------------------
def hf_generate_batch(model, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    """One static batch, left padded; returns the generated ids of each prompt."""
    width = max(len(p) for p in batch)
    input_ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        input_ids[row, width - len(p):] = torch.tensor(p)
        attention_mask[row, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD_ID,
        )
    gen = out[:, width:].tolist()
    if any(len(g) != new_tokens for g in gen):
        raise RuntimeError(f"HF generate did not produce exactly {new_tokens} tokens per prompt")
    return gen


def run_hf(model, prompts: list[list[int]], new_tokens: int, batch_size: int) -> list[list[int]]:
    out = []
    for i in range(0, len(prompts), batch_size):
        out.extend(hf_generate_batch(model, prompts[i:i + batch_size], new_tokens))
    return out


def hf_greedy_ignore_eos(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Unpadded batch-1 greedy decoding that, like splitfuse's ignore_eos, may pick EOS and go on.

    (generate's min_new_tokens instead masks EOS, which would differ wherever EOS is the argmax.)"""
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0,
            eos_token_id=[], pad_token_id=PAD_ID,  # no EOS: always new_tokens tokens
        )
    return out[0, len(prompt):].tolist()


# ---- timing & reporting --------------------------------------------------------------------------
def time_once(fn) -> tuple[float, float, object]:
    """Wall seconds, process CPU seconds (all threads) and the result of fn()."""
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, time.process_time() - c0, result


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict:
    model_name = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": model_name,
        "cores": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "splitfuse": getattr(splitfuse, "__version__", "dev"),
        "date": datetime.date.today().isoformat(),
    }


def profile_splitfuse(pipe, prompts, new_tokens, path: Path) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_splitfuse(pipe, prompts, new_tokens)
    prof.disable()
    prof.dump_stats(str(path))
    print(f"\ncProfile of one splitfuse run written to {path}; top 25 by cumulative time:")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


class _StageTimer:
    """Wraps engine, model and backend callables with wall-clock timers, split by step kind.

    Patches public attributes of a live pipeline (instances, the detokenizer class and two module
    functions); undo() restores them. Nested stages are included in their parents (attention
    includes write_kv and _plan); "engine.step: rest" is what no stage covers (request bookkeeping,
    sampling setup, logprobs)."""

    STEP = "engine.step (all)"
    STAGES = ("scheduler.schedule", "build_batch", "model.forward (all)", "model.logits (lm_head)",
              "backend.sample", "detokenizer.add")  # disjoint parts of a step

    def __init__(self, pipe) -> None:
        from splitfuse.backends import torch_ops
        from splitfuse.core import engine as engine_mod
        from splitfuse.core.detokenizer import IncrementalDetokenizer

        self.times: dict[tuple[str, str], float] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.kind = "host"
        self.steps = {"prefill": 0, "decode": 0}
        self._undo: list = []
        eng = pipe.engine
        stage = dict(zip(("schedule", "build", "forward", "logits", "sample", "detok"), self.STAGES))
        targets = [
            (eng, "step", self.STEP),
            (eng.scheduler, "schedule", stage["schedule"]),
            (engine_mod, "build_batch", stage["build"]),
            (eng.model, "forward", stage["forward"]),
            (eng.model, "logits", stage["logits"]),
            (eng.backend, "sample", stage["sample"]),
            (IncrementalDetokenizer, "add", stage["detok"]),
            (eng.backend, "embedding", "op embedding"),
            (eng.backend, "linear", "op linear (matmuls)"),
            (eng.backend, "rotary_attention", "op rotary_attention (incl. attention)"),
            (eng.backend, "attention", "op attention"),
            (torch_ops, "write_kv", "  attention: write_kv"),
            (torch_ops, "_plan", "  attention: _plan (index building)"),
            (eng.backend, "rotary", "op rotary"),
            (eng.backend, "rms_norm", "op rms_norm"),
            (eng.backend, "silu_and_mul", "op silu_and_mul"),
        ]
        for owner, name, label in targets:
            if hasattr(owner, name):
                self._wrap(owner, name, label)
        # The step's kind is known once its plan is built; the step's end makes it "host" again.
        build, step = engine_mod.build_batch, eng.step

        def kind_build_batch(plan, *args, **kwargs):
            self.kind = "decode" if all(i.num_tokens == 1 for i in plan.items) else "prefill"
            self.steps[self.kind] += 1
            return build(plan, *args, **kwargs)

        def step_then_host():
            try:
                return step()
            finally:
                self.kind = "host"

        self._set(engine_mod, "build_batch", kind_build_batch)
        self._set(eng, "step", step_then_host)

    def rest_ms(self, kind: str) -> float:
        """Time inside engine.step that no stage covers."""
        covered = sum(self.times.get((kind, label), 0.0) for label in self.STAGES)
        return max(0.0, self.times.get((kind, self.STEP), 0.0) - covered) * 1000

    def _set(self, owner, name, value) -> None:
        had = name in vars(owner)
        self._undo.append((owner, name, vars(owner)[name] if had else None, had))
        setattr(owner, name, value)

    def _wrap(self, owner, name, label) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = (self.kind, label)
                self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1
        self._set(owner, name, timed)

    def undo(self) -> None:
        for owner, name, old, had in reversed(self._undo):
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)


def breakdown_splitfuse(pipe, prompts, new_tokens, runs: int) -> None:
    """Per-stage wall time of the least disturbed of `runs` instrumented splitfuse runs."""
    results = []
    for _ in range(runs):
        timer = _StageTimer(pipe)
        try:
            wall, _, _ = time_once(lambda: run_splitfuse(pipe, prompts, new_tokens))
        finally:
            timer.undo()
        results.append((wall, timer))
    wall, timer = min(results, key=lambda r: r[0])
    steps = timer.steps
    print(f"\nsplitfuse stage breakdown (best of {runs} instrumented runs: {wall * 1000:.1f} ms; "
          f"{steps['prefill']} steps with prompt tokens, {steps['decode']} decode-only steps)")
    labels = list(dict.fromkeys(label for _, label in timer.times))
    print(f"  {'stage':40s} {'total ms':>9s} {'%':>6s} {'prefill ms':>11s} {'decode ms':>10s} {'host ms':>8s} {'calls':>6s}")
    for label in labels:
        per = {k: timer.times.get((k, label), 0.0) * 1000 for k in ("prefill", "decode", "host")}
        total = sum(per.values())
        calls = sum(timer.calls.get((k, label), 0) for k in ("prefill", "decode", "host"))
        print(f"  {label:40s} {total:9.1f} {100 * total / (wall * 1000):5.1f}% {per['prefill']:11.1f} "
              f"{per['decode']:10.1f} {per['host']:8.1f} {calls:6d}")
        if label == timer.STEP:
            rest = {k: timer.rest_ms(k) for k in ("prefill", "decode", "host")}
            print(f"  {'engine.step: rest (bookkeeping)':40s} {sum(rest.values()):9.1f} "
                  f"{100 * sum(rest.values()) / (wall * 1000):5.1f}% {rest['prefill']:11.1f} "
                  f"{rest['decode']:10.1f} {rest['host']:8.1f} {'':>6s}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    info = machine_info()

    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="splitfuse-bench-")
        model_dir = make_tiny_model(Path(tmp.name) / "tiny-llama", **MODEL_KWARGS)
    else:
        model_dir = args.model_dir
    try:
        return _bench(args, argv, info, threads, model_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _bench(args, argv, info, threads, model_dir) -> int:
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    prompts = make_prompts(args.prompts, args.min_len, args.max_len, hf_config.vocab_size, args.seed)
    n_req, n_new = len(prompts), args.new_tokens
    gen_tokens = n_req * n_new
    prompt_tokens = sum(map(len, prompts))
    warm = prompts[:4]
    print(f"workload: {n_req} prompts, lengths {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"({prompt_tokens} prompt tokens), {n_new} new tokens each ({gen_tokens} generated); "
          f"torch threads {threads}", flush=True)

    # (a) splitfuse and (b) transformers: load both, warm both up, then time them interleaved
    # (sf, hf, sf, hf, ...) so that load from other processes hits both sides alike.
    engine_kwargs = {"dtype": args.dtype}
    if args.token_budget is not None:
        engine_kwargs["token_budget"] = args.token_budget
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    pipes = {name: splitfuse.pipeline(str(model_dir), backend=name, **engine_kwargs) for name in backends}
    pipe = pipes[backends[0]]  # the one --breakdown and --profile look at
    budget = pipe.engine.config.token_budget
    for p in pipes.values():
        run_splitfuse(p, warm, 4)  # warm-up
    hf_model = None
    if not args.skip_hf:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
        run_hf(hf_model, warm, 4, args.hf_batch)  # warm-up
    load_before = _loadavg()
    all_times = {name: [] for name in backends}
    all_cpu = {name: [] for name in backends}
    all_tokens = {}
    hf_times, hf_cpu, hf_tokens = [], [], None
    for r in range(args.repeats):
        line = f"run {r + 1}/{args.repeats}:"
        for name, p in pipes.items():
            t, c, all_tokens[name] = time_once(lambda: run_splitfuse(p, prompts, n_new))
            all_times[name].append(t)
            all_cpu[name].append(c)
            line += f" splitfuse[{name}] {t:.3f}s (cpu {c:.3f}s)"
        if hf_model is not None:
            t, c, hf_tokens = time_once(lambda: run_hf(hf_model, prompts, n_new, args.hf_batch))
            hf_times.append(t)
            hf_cpu.append(c)
            line += f", transformers {t:.3f}s (cpu {c:.3f}s)"
        print(line, flush=True)
    load_after = _loadavg()
    sf_times, sf_cpu, sf_tokens = all_times[backends[0]], all_cpu[backends[0]], all_tokens[backends[0]]

    # sanity: splitfuse vs HF unpadded batch-1 greedy
    check_ok = True
    if hf_model is not None and args.check:
        print(f"\nsanity check: splitfuse vs HF unpadded batch-1 greedy, first {args.check} prompts")
        for i in range(min(args.check, n_req)):
            ref = hf_greedy_ignore_eos(hf_model, prompts[i], n_new)
            for name in backends:
                same = ref == all_tokens[name][i]
                check_ok &= same
                first_diff = next((j for j, (a, b) in enumerate(zip(ref, all_tokens[name][i])) if a != b), None)
                print(f"  prompt {i} (len {len(prompts[i])}) [{name}]: "
                      f"{'MATCH' if same else f'DIFFER at token {first_diff}'}")
        padded_same = sum(a == b for a, b in zip(hf_tokens, sf_tokens))
        print(f"  (info) HF left-padded batches agree with splitfuse on {padded_same}/{n_req} prompts "
              "(generate's min_new_tokens masks EOS, padding shifts numerics)")

    # report: best of the timed runs is the headline (least disturbed by other load), median beside it
    def row(name, times):
        best, med = min(times), statistics.median(times)
        return (f"| {name} | {best:.3f} / {med:.3f} | {gen_tokens / best:.0f} / {gen_tokens / med:.0f} "
                f"| {n_req / best:.1f} / {n_req / med:.1f} |")

    cmd = shlex.join(["python", "scripts/bench_offline.py", *(sys.argv[1:] if argv is None else argv)])
    if args.model_dir is None:
        k = MODEL_KWARGS
        model_line = (f"random tiny Llama ({k['num_layers']} layers, hidden {k['hidden_size']}, {k['num_heads']} heads / "
                      f"{k['num_kv_heads']} KV heads, intermediate {k['intermediate_size']}, vocab {k['vocab_size']}), {args.dtype}")
    else:
        model_line = f"{args.model_dir}, {args.dtype}"
    attn = getattr(hf_model.config, "_attn_implementation", "?") if hf_model is not None else "n/a"
    lines = [
        "",
        "## CPU offline throughput vs HF transformers",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['cpu']}, {info['cores']} cores; torch threads {threads}; "
        f"load average before/after timing: {load_before} / {load_after}",
        f"- Software: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}",
        f"- Model: {model_line}",
        f"- Workload: {n_req} prompts of {args.min_len}-{args.max_len} random token ids (seed {args.seed}; "
        f"{prompt_tokens} prompt tokens), {n_new} greedy new tokens each ({gen_tokens} generated)",
        f"- splitfuse: backend {', '.join(backends)}, all prompts in one pipe() call, token_budget {budget}, ignore_eos",
        f"- transformers: generate, static batches of {args.hf_batch} in arrival order, left padded, "
        f"min_new_tokens = max_new_tokens = {n_new}, attn_implementation {attn}",
        f"- Timing: one warm-up run each, then {args.repeats} timed runs of the whole workload, the two engines "
        "interleaved; figures are best / median",
        "",
        "| engine | time (s) | generated tokens/s | requests/s |",
        "|---|---|---|---|",
        *(row(f"splitfuse ({name})", all_times[name]) for name in backends),
    ]
    if hf_times:
        lines.append(row("transformers generate", hf_times))
        ratio_best = min(hf_times) / min(sf_times)
        ratio_med = statistics.median(hf_times) / statistics.median(sf_times)
        lines += ["", f"Throughput ratio splitfuse ({backends[0]}) / transformers: **{ratio_best:.2f}x** (best), {ratio_med:.2f}x (median); "
                      f"process CPU time per run (best): splitfuse {min(sf_cpu):.3f} s, transformers {min(hf_cpu):.3f} s "
                      f"(ratio {min(hf_cpu) / min(sf_cpu):.2f}x)."]
        if args.check:
            lines.append(f"Sanity check, greedy tokens of the first {args.check} prompts equal HF unpadded batch-1 "
                         f"generate: {'pass' if check_ok else 'FAIL'}.")
    lines += ["", "Reproduce (from the repository root):", "", "```", cmd, "```", ""]
    print("\n".join(lines))

    if args.breakdown:
        breakdown_splitfuse(pipe, prompts, n_new, max(3, args.repeats))
    if args.profile:
        profile_splitfuse(pipe, prompts, n_new, args.profile)
    return 0 if check_ok else 1


if __name__ == "__main__":
    sys.exit(main())
