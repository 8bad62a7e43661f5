#!/usr/bin/env python
"""splitfuse vs vLLM's CPU build, side by side in one run on the same model and workloads.

One script process drives both engines (vLLM's own engine core runs in its child process, as it
does for any user of its offline `LLM` API), interleaved: every round runs each engine once,
the engine that goes first rotating from round to round, so load from other processes hits both
alike. Reported: best and median of each engine, and their paired ratios (per round).

  offline   N prompts of random token ids (lengths min-max, fixed seed), M greedy new tokens
            each, EOS ignored, all prompts in one call: generated tokens/s.
  decode    one prompt, batch 1: ms per generated token = (time of N new tokens - time of 1)
            / (N - 1), so prefill and per-call overhead cancel out.
  startup   constructing the engine to its first token (once per engine, before the rounds).

Greedy tokens of both engines are compared prompt by prompt. The machine's copy bandwidth
(a large tensor copy, per thread count) is measured and batch-1 decode's weight bytes per token
÷ its time is reported as a fraction of it. Prefix caching is off in both engines: the rounds
repeat the same prompts.

vLLM lives in its own venv (see docs/benchmarks.md, "splitfuse vs vLLM CPU"), with splitfuse
installed there without dependencies:

    /work/vllm-venv/bin/python scripts/bench_vs_vllm.py --model demo --dtype float32 --threads 2
    /work/vllm-venv/bin/python scripts/bench_vs_vllm.py --model 0.5b --dtype bfloat16 --threads 1 --quick
    python scripts/bench_vs_vllm.py --engines splitfuse --quick      # splitfuse only (no vLLM installed)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import splitfuse
from splitfuse.testing.tiny_model import make_tiny_model

DEMO_MODEL = Path(splitfuse.__file__).parent / "data" / "demo_model"
# Qwen2.5-0.5B's layer shapes with a 32000-token vocabulary and an untied LM head
# (scripts/bench_quantized_decode.py's model), random weights written once to a temp dir.
HALF_B_KWARGS = dict(arch="llama", num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
                     intermediate_size=4864, vocab_size=32000, max_position_embeddings=1024, seed=0,
                     init_scale=1.0)
FIRST_REGULAR_ID = 3  # ids 0, 1, 2 are <unk>/pad, <s>, </s> in both models
ENGINES = ("splitfuse", "vllm")
KV_CACHE_GIB = 1  # each engine's KV cache (splitfuse kv_cache_gib, vLLM VLLM_CPU_KVCACHE_SPACE)
MAX_DIFFS = 8  # differing prompts listed one by one
CPU_FLAG_PREFIXES = ("avx2", "avx512", "amx", "fma", "f16c", "avx_vnni")


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: int = 32
    min_len: int = 32
    max_len: int = 512
    new_tokens: int = 64
    decode_prompt: int = 128
    decode_tokens: int = 256
    rounds: int = 5


QUICK = Workload(prompts=8, min_len=32, max_len=128, new_tokens=16, decode_prompt=128, decode_tokens=32, rounds=2)


def parse_args(argv=None) -> argparse.Namespace:
    full = Workload()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo",
                   help="'demo' (the embedded demo model), '0.5b' (random 0.5B-shaped Llama) or a HF model directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both engines (default float32)")
    p.add_argument("--threads", type=int, default=1, help="compute threads of each engine (default 1)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated, from splitfuse,vllm (default both; vllm must be importable)")
    p.add_argument("--quick", action="store_true",
                   help=f"small workload: {QUICK.prompts} prompts of {QUICK.min_len}-{QUICK.max_len} tokens, "
                        f"{QUICK.new_tokens} new; decode {QUICK.decode_tokens} tokens; {QUICK.rounds} rounds")
    p.add_argument("--prompts", type=int, help=f"offline prompts (default {full.prompts})")
    p.add_argument("--min-len", type=int, help=f"shortest offline prompt (default {full.min_len})")
    p.add_argument("--max-len", type=int, help=f"longest offline prompt (default {full.max_len})")
    p.add_argument("--new-tokens", type=int, help=f"offline new tokens per prompt (default {full.new_tokens})")
    p.add_argument("--decode-prompt", type=int, help=f"batch-1 decode prompt length (default {full.decode_prompt})")
    p.add_argument("--decode-tokens", type=int, help=f"batch-1 decode new tokens (default {full.decode_tokens})")
    p.add_argument("--rounds", type=int, help=f"timed rounds (default {full.rounds})")
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens per forward pass of both engines (splitfuse token_budget, vLLM "
                        "max_num_batched_tokens); default: each engine's own default")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM enforce_eager=True (no torch.compile)")
    p.add_argument("--vllm-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND (default: cores 0..threads-1; 'nobind' lets the OS place threads)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--settle", type=float, default=1.5,
                   help="seconds of rest before each timed call, so the previous engine's pollers go idle (default 1.5)")
    p.add_argument("--copy-mib", type=int, default=256,
                   help="size of the tensor copied to measure memory bandwidth (default 256 MiB)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else full
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Workload) if getattr(args, f.name) is not None}
    args.workload = dataclasses.replace(base, **overrides)
    for name, value in dataclasses.asdict(args.workload).items():
        if value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if args.workload.min_len > args.workload.max_len:
        p.error(f"--min-len ({args.workload.min_len}) must be <= --max-len ({args.workload.max_len})")
    if args.workload.decode_tokens < 2:
        p.error(f"--decode-tokens must be >= 2 (got {args.workload.decode_tokens}): ms/token is a difference of two runs")
    if args.settle < 0:
        p.error(f"--settle must be >= 0 seconds (got {args.settle})")
    if args.threads < 1 or args.copy_mib < 1:
        p.error(f"--threads and --copy-mib must be >= 1 (got {args.threads} and {args.copy_mib})")
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engine_list) - set(ENGINES))
    if unknown or not args.engine_list:
        p.error(f"--engines: expected a comma-separated list from {','.join(ENGINES)}, got {args.engines!r}")
    return args


# ---- machine -----------------------------------------------------------------------------------
def cpu_info() -> dict:
    """CPU model name and its vector/matrix flags, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == (platform.processor() or platform.machine()):
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = value.split()
    wanted = sorted(f for f in flags if f.startswith(CPU_FLAG_PREFIXES))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"model": model, "flags": wanted, "cores": cores}


def copy_bandwidth_gbs(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Best copy bandwidth of a `mib`-MiB fp32 tensor with `threads` torch threads, GB/s counting
    bytes read plus bytes written (more than the caches hold, so it is memory's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib * (1 << 20) // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = min(_timed(lambda: dst.copy_(src))[0] for _ in range(repeats))
        return 2 * src.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)


def decode_weight_bytes(config: dict, dtype: str) -> int:
    """Weight bytes batch-1 decode reads per token: every layer matrix, the final norm and the LM
    head (the embedding table is read one row at a time)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    per_layer = h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h + 3 * h * inter + 2 * h
    params = layers * per_layer + h + config["vocab_size"] * h
    return params * (4 if dtype == "float32" else 2)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---- workload ------------------------------------------------------------------------------------
def make_prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(FIRST_REGULAR_ID, vocab, (length,), generator=gen).tolist() for length in lengths]


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _settled_timed(fn, settle_s: float) -> tuple[float, object]:
    """_timed(fn) after a pause: vLLM's worker keeps polling for work (a yielding busy loop, 1 s
    in vLLM 0.32) after each call, which would take a core from whatever runs next."""
    time.sleep(settle_s)
    return _timed(fn)


# ---- engines -----------------------------------------------------------------------------------
class SplitfuseEngine:
    """splitfuse's pipeline API: all prompts in one call, greedy, EOS ignored."""

    name = "splitfuse"

    def __init__(self, model_dir: Path, args) -> None:
        kwargs = dict(dtype=args.dtype, enable_prefix_caching=False, kv_cache_gib=KV_CACHE_GIB,
                      max_model_len=max_model_len(args.workload))
        if args.token_budget is not None:
            kwargs["token_budget"] = args.token_budget
        self.pipe = splitfuse.pipeline(str(model_dir), backend="cpu", **kwargs)
        self.settings = {"backend": "cpu", "token_budget": self.pipe.engine.config.token_budget,
                         "prefix caching": False, "kv_cache_gib": KV_CACHE_GIB,
                         "torch threads": torch.get_num_threads()}

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        out = self.pipe(prompts, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return [r.token_ids for r in out]

    def close(self) -> None:
        self.pipe.close()


class VllmEngine:
    """vLLM's offline LLM API with the settings its CPU docs recommend (imported only here)."""

    name = "vllm"

    def __init__(self, model_dir: Path, args) -> None:
        from vllm import LLM, SamplingParams  # noqa: PLC0415 - splitfuse itself never imports vllm

        self._sampling = SamplingParams
        kwargs = dict(model=str(model_dir), dtype=args.dtype, max_model_len=max_model_len(args.workload),
                      enable_prefix_caching=False, enforce_eager=args.vllm_eager, seed=0)
        if args.token_budget is not None:
            kwargs["max_num_batched_tokens"] = args.token_budget
        self.llm = LLM(**kwargs)
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        self.settings = {"max_num_batched_tokens": sched.max_num_batched_tokens, "max_num_seqs": sched.max_num_seqs,
                         "enforce_eager": args.vllm_eager, "prefix caching": False,
                         "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                         "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = self._sampling(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm
        gc.collect()


ENGINE_CLASSES = {"splitfuse": SplitfuseEngine, "vllm": VllmEngine}


def max_model_len(w: Workload) -> int:
    return max(w.max_len + w.new_tokens, w.decode_prompt + w.decode_tokens)


def configure_vllm_env(args) -> None:
    """vLLM CPU's environment, set before vllm is imported: KV cache size and thread binding."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    bind = args.vllm_bind or (f"0-{args.threads - 1}" if args.threads > 1 else "0")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def require_vllm() -> str:
    try:
        import vllm  # noqa: PLC0415
    except ImportError as exc:
        raise SystemExit(f"--engines includes vllm, but vllm is not importable in {sys.executable} ({exc}); "
                         "install vllm-cpu in its own venv (docs/benchmarks.md, 'splitfuse vs vLLM CPU') "
                         "or pass --engines splitfuse") from None
    return vllm.__version__


# ---- the run -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Results:
    startup_s: dict[str, float] = dataclasses.field(default_factory=dict)
    offline_s: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    decode_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    offline_tokens: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    decode_tokens: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    settings: dict[str, dict] = dataclasses.field(default_factory=dict)


def run_rounds(engines: dict, prompts: list[list[int]], decode_prompt: list[int], w: Workload,
               settle_s: float) -> Results:
    """Every round runs each engine's offline and decode workloads, the first engine rotating."""
    res = Results()
    names = list(engines)
    for name in names:
        res.offline_s[name], res.decode_ms[name] = [], []
    for r in range(w.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        line = [f"round {r + 1}/{w.rounds}:"]
        for name in order:
            engine = engines[name]
            seconds, res.offline_tokens[name] = _settled_timed(lambda: engine.generate(prompts, w.new_tokens), settle_s)
            one_s, _ = _settled_timed(lambda: engine.generate([decode_prompt], 1), settle_s)
            all_s, (res.decode_tokens[name],) = _settled_timed(
                lambda: engine.generate([decode_prompt], w.decode_tokens), settle_s)
            res.offline_s[name].append(seconds)
            res.decode_ms[name].append(1000 * (all_s - one_s) / (w.decode_tokens - 1))
            line.append(f"{name} offline {seconds:.3f}s decode {res.decode_ms[name][-1]:.2f} ms/token")
        print("  ".join(line), flush=True)
    return res


def check_lengths(res: Results, w: Workload) -> None:
    for name, outs in res.offline_tokens.items():
        bad = [i for i, toks in enumerate(outs) if len(toks) != w.new_tokens]
        if bad:
            raise RuntimeError(f"{name}: prompts {bad[:5]} did not generate exactly {w.new_tokens} tokens")


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def ratio_line(label: str, num: list[float], den: list[float]) -> str:
    """min(num) / min(den) (best against best), then the median of the paired ratios of each round."""
    ratios = [a / b for a, b in zip(num, den)]
    return (f"{label}: best {min(num) / min(den):.2f}x, paired median {statistics.median(ratios):.2f}x "
            f"(per round {', '.join(f'{x:.2f}' for x in ratios)})")


def report(args, argv, info: dict, versions: dict, bandwidth: dict, model_line: str, config: dict,
           prompts: list[list[int]], res: Results, loads: tuple[str, str]) -> str:
    w = args.workload
    gen_tokens = len(prompts) * w.new_tokens
    names = list(res.offline_s)
    cmd = shlex.join(["python", "scripts/bench_vs_vllm.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "",
        f"## splitfuse vs vLLM CPU: {model_line}, {args.dtype}, {args.threads} thread(s)",
        "",
        f"- Date: {datetime.date.today().isoformat()}; load average before/after: {loads[0]} / {loads[1]}",
        f"- CPU: {info['model']}, {info['cores']} usable cores; "
        f"flags: {' '.join(info['flags']) or 'none of avx2/avx512/amx'}",
        f"- Software: Python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Offline: {len(prompts)} prompts of {w.min_len}-{w.max_len} random token ids (seed {args.seed}; "
        f"{sum(map(len, prompts))} prompt tokens), {w.new_tokens} greedy new tokens each, EOS ignored",
        f"- Decode: batch 1, a {w.decode_prompt}-token prompt, {w.decode_tokens} new tokens; "
        f"ms/token = (t({w.decode_tokens}) - t(1)) / {w.decode_tokens - 1}",
        f"- {w.rounds} rounds, engines interleaved, first engine rotating, {args.settle} s rest before each "
        "timed call; figures are best / median",
    ]
    for name in names:
        lines.append(f"- {name} settings: " + ", ".join(f"{k} {v}" for k, v in res.settings[name].items()))
    lines += [
        "",
        "| engine | startup to first token (s) | offline time (s) | offline generated tokens/s | decode ms/token |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        off, dec = res.offline_s[name], res.decode_ms[name]
        lines.append(f"| {name} | {res.startup_s[name]:.2f} | {min(off):.3f} / {statistics.median(off):.3f} "
                     f"| {_rate(gen_tokens / min(off))} / {_rate(gen_tokens / statistics.median(off))} "
                     f"| {min(dec):.2f} / {statistics.median(dec):.2f} |")
    lines.append("")
    weight_bytes = decode_weight_bytes(config, args.dtype)
    copy = bandwidth[args.threads]
    per_thread = ", ".join(f"{t} thread(s) {gbs:.1f} GB/s" for t, gbs in bandwidth.items())
    lines.append(f"Copy bandwidth (read + write): {per_thread}. "
                 f"Batch-1 decode reads {weight_bytes / 1e6:.1f} MB of weights per token:")
    for name in names:
        gbs = weight_bytes / (min(res.decode_ms[name]) / 1000) / 1e9
        lines.append(f"- {name}: {gbs:.2f} GB/s at its best decode, "
                     f"{100 * gbs / copy:.0f}% of the {args.threads}-thread copy bandwidth")
    if "vllm" in names and "splitfuse" in names:
        sf, vl = "splitfuse", "vllm"
        lines += [
            "",
            ratio_line("Offline throughput splitfuse / vLLM", res.offline_s[vl], res.offline_s[sf]),
            ratio_line("Decode ms/token vLLM / splitfuse", res.decode_ms[vl], res.decode_ms[sf]),
            f"Startup splitfuse / vLLM: {res.startup_s[sf] / res.startup_s[vl]:.2f}x "
            f"(vLLM takes {res.startup_s[vl] / res.startup_s[sf]:.1f}x as long)",
        ]
        same = [i for i, (a, b) in enumerate(zip(res.offline_tokens[sf], res.offline_tokens[vl])) if a == b]
        lines.append(f"Greedy tokens: {len(same)}/{len(prompts)} offline prompts match token for token")
        differ = [i for i in range(len(prompts)) if i not in same]
        lines += [f"  prompt {i} (length {len(prompts[i])}) differs from token "
                  f"{first_difference(res.offline_tokens[sf][i], res.offline_tokens[vl][i])}" for i in differ[:MAX_DIFFS]]
        if len(differ) > MAX_DIFFS:
            lines.append(f"  ... and {len(differ) - MAX_DIFFS} more")
        d = first_difference(res.decode_tokens[sf], res.decode_tokens[vl])
        lines.append(f"Batch-1 decode tokens: {'match' if d is None else f'differ from token {d}'} "
                     f"({w.decode_tokens} tokens)")
    lines += ["", "Reproduce (from the repository root, in the venv that has both engines):", "", "```", cmd, "```", ""]
    return "\n".join(lines)


def resolve_model(spec: str, tmp: Path) -> tuple[Path, str]:
    if spec == "demo":
        return DEMO_MODEL, "the embedded demo model (4.2M-parameter Llama)"
    if spec == "0.5b":
        k = HALF_B_KWARGS
        print("writing the random 0.5B-shaped Llama to a temp dir ...", flush=True)
        path = make_tiny_model(tmp / "llama-0.5b", **k)
        return path, (f"random 0.5B-shaped Llama ({k['num_layers']} layers, hidden {k['hidden_size']}, "
                      f"{k['num_heads']} heads / {k['num_kv_heads']} KV heads, intermediate {k['intermediate_size']}, "
                      f"vocab {k['vocab_size']})")
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model: expected 'demo', '0.5b' or a model directory with config.json, got {spec!r}")
    return path, str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    w = args.workload
    torch.set_num_threads(args.threads)
    versions = {"torch": torch.__version__, "splitfuse": getattr(splitfuse, "__version__", "dev")}
    if "vllm" in args.engine_list:
        configure_vllm_env(args)
        versions["vllm"] = require_vllm()
    info = cpu_info()
    print(f"CPU: {info['model']}, {info['cores']} usable cores; flags: {' '.join(info['flags'])}", flush=True)
    bandwidth = {t: copy_bandwidth_gbs(t, args.copy_mib) for t in range(1, args.threads + 1)}

    with tempfile.TemporaryDirectory(prefix="splitfuse-vs-vllm-") as tmp:
        model_dir, model_line = resolve_model(args.model, Path(tmp))
        config = json.loads((model_dir / "config.json").read_text())
        prompts = make_prompts(w.prompts, w.min_len, w.max_len, config["vocab_size"], args.seed)
        decode_prompt = make_prompts(1, w.decode_prompt, w.decode_prompt, config["vocab_size"], args.seed + 1)[0]
        warm = prompts[:2]

        # Start-up: construct to first token, one engine after the other.
        engines, res_startup, settings = {}, {}, {}
        try:
            for name in args.engine_list:
                start = time.perf_counter()
                engine = ENGINE_CLASSES[name](model_dir, args)
                engine.generate([warm[0]], 1)
                res_startup[name] = time.perf_counter() - start
                engines[name] = engine
                settings[name] = engine.settings
                print(f"{name}: started in {res_startup[name]:.2f}s", flush=True)
            for engine in engines.values():  # warm-up: both sizes of batch, both code paths
                engine.generate(warm, 4)
                engine.generate([decode_prompt], 4)
            load_before = load_average()
            res = run_rounds(engines, prompts, decode_prompt, w, args.settle)
            load_after = load_average()
        finally:
            for engine in engines.values():
                engine.close()
        res.startup_s, res.settings = res_startup, settings
        check_lengths(res, w)
        print(report(args, argv, info, versions, bandwidth, model_line, config, prompts, res, (load_before, load_after)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
