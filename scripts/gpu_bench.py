#!/usr/bin/env python
"""splitfuse on a Llama-3-8B-shaped bf16 model with random weights, against the hardware limits
measured in the same run. Writes $OUT/splitfuse.json (OUT defaults to ./gpu_out).

Nothing is downloaded and nothing is written to disk: the model is built from a transformers
LlamaConfig and its weights are random tensors made directly on the device, streamed through the
model's own `load_weights` (so the fused qkv / gate_up matrices are built the way a checkpoint's
would be). The engine has no tokenizer: prompts are lists of token ids.

Sections (`--only a,b` runs some; `hardware` and `startup` run first whenever another section
needs them):
  hardware   device-to-device copy bandwidth (torch copy of a >= 1 GiB tensor, read + write bytes)
             and the decode lower bound: matmul weight bytes / that bandwidth.
  startup    model built (random weights on the device) + KV cache allocated + decode CUDA graphs
             captured (Triton's JIT compiles happen there), then the first request end to end.
  matmuls    the linears of one step alone (all layers + lm_head, F.linear on the model's own
             weights), CUDA-graph captured, at M = 1, 16, 64, 256, 2048 tokens.
  attention  the paged-attention kernel alone vs torch scaled_dot_product_attention on the same
             work: dense causal prefill (TFLOP/s) and decode with long contexts (KV bytes / time
             against the copy bandwidth); the max abs difference of the two outputs is recorded.
  decode     steady-state decode at batch 1, 16, 64 through engine.step(), against the bandwidth
             limit and against its own matmuls alone; where a CUDA graph serves the batch, the same
             steps op by op too (eager_step_ms_median, graph_speedup).
  generate   prompt 512 + 128 new tokens at batch 1, 16, 64, end to end: the workload
             scripts/gpu_bench_hf.py runs with transformers `generate`.
  mixed      SplitFuse steps at a 2048-token budget (decodes + prompt chunks with contexts of a few
             thousand tokens) against the time of their matmuls alone.
  offline    the FastGen-like workload: 32 requests, prompts ~ N(2600, 30%) clamped to [512, 4096],
             60 new tokens each; requests/s.
  quantized  (only when named in --only; it releases the main engine) batch-1 decode with the
             layers' matrices in 16 bits vs quantized at load to int8 (W8A16) and int4 (W4A16),
             one engine at a time: tokens/s, speed-up and weight MiB of each.
  summary    the GPU performance targets (docs/benchmarks.md) as ratios, with $OUT/hf.json when the HF run wrote one.

Each section is timed with warm-up (CUDA events, or wall clock around whole engine steps, which
end in a host sync anyway), runs inside try/except so one failure is recorded and the others run,
and the JSON is rewritten after every section, so a run killed by its timeout keeps what it did.

    python scripts/gpu_bench.py                          # the H100 run (~1 minute)
    python scripts/gpu_bench.py --only decode,mixed
    python scripts/gpu_bench.py --only quantized         # W8A16 / W4A16 decode vs bf16
    TRITON_INTERPRET=1 python scripts/gpu_bench.py --tiny --backend cuda   # CPU dry run (kernels
    python scripts/gpu_bench.py --tiny --backend cpu                       #  in the interpreter)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

GB = 1e9
GIB = 1 << 30
SECTIONS = ("hardware", "startup", "matmuls", "attention", "decode", "generate", "mixed", "offline", "quantized",
            "summary")
NEEDS_ENGINE = {"startup", "matmuls", "decode", "generate", "mixed", "offline"}
OPT_IN = {"quantized"}  # run only when --only names them


# ---- the model shape and the workloads (gpu_bench_hf.py imports these, so both run the same) ----
def llama3_8b_config(num_layers: int | None = None):
    """Llama-3-8B's config.json as a LlamaConfig (random weights come later, from it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_layers or 32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        architectures=["LlamaForCausalLM"],
    )


def tiny_config(num_layers: int | None = None):
    """A 2-layer Llama with the same structure (GQA 2:1, llama3 rope) for CPU dry runs."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers or 2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        architectures=["LlamaForCausalLM"],
    )


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Token-id prompts; ids >= 3 so no special id of a small vocabulary shows up."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def offline_lengths(scale: "Scale", seed: int = 0) -> list[int]:
    """FastGen-like prompt lengths: N(mean, 30% of mean) rounded, clamped to [lo, hi]."""
    rng = random.Random(seed)
    mean = scale.offline_mean
    return [min(scale.offline_max, max(scale.offline_min, round(rng.gauss(mean, 0.3 * mean))))
            for _ in range(scale.offline_requests)]


@dataclass(frozen=True)
class Scale:
    """Sizes of every section. FULL is the H100 run; QUICK a shorter GPU smoke run; TINY a CPU dry run
    (the Triton interpreter takes ~0.1-1 s per kernel launch, so everything there is minimal)."""

    copy_bytes: int = 2 * GIB
    matmul_tokens: tuple[int, ...] = (1, 16, 64, 256, 2048)
    attn_prefill: tuple[tuple[int, int], ...] = ((1, 8192), (8, 2048))  # (sequences, prompt length)
    attn_decode: tuple[tuple[int, int], ...] = ((1, 32768), (16, 8192), (64, 4096))  # (sequences, context)
    decode_batches: tuple[int, ...] = (1, 16, 64)
    decode_prompt: int = 128
    decode_warmup: int = 8
    decode_steps: int = 64
    gen_batches: tuple[int, ...] = (1, 16, 64)
    gen_prompt: int = 512
    gen_new: int = 128
    token_budget: int = 2048
    mixed_decodes: int = 16
    mixed_decode_ctx: int = 2048
    mixed_prompt: int = 8192  # chunked at (budget - decodes) tokens: contexts 0, ~2k, ~4k, ~6k
    offline_requests: int = 32
    offline_mean: int = 2600
    offline_min: int = 512
    offline_max: int = 4096
    offline_new: int = 60
    time_target_s: float = 0.25  # each kernel timing repeats until about this long
    max_model_len: int = 40960
    kv_cache_gib: float = 1.0  # only where the backend cannot size from free memory (cpu)


FULL = Scale()
QUICK = replace(FULL, matmul_tokens=(1, 64, 2048), attn_prefill=((1, 8192),), attn_decode=((16, 8192),),
                decode_batches=(1, 64), decode_steps=32, gen_batches=(64,), gen_new=32, offline_requests=8)
TINY = Scale(
    copy_bytes=64 << 20, matmul_tokens=(1, 16, 64), attn_prefill=((1, 48), (2, 24)), attn_decode=((1, 96), (4, 40)),
    decode_batches=(1, 4), decode_prompt=8, decode_warmup=1, decode_steps=3, gen_batches=(1, 4), gen_prompt=12,
    gen_new=3, token_budget=32, mixed_decodes=4, mixed_decode_ctx=20, mixed_prompt=84, offline_requests=4,
    offline_mean=40, offline_min=16, offline_max=64, offline_new=3, time_target_s=0.0, max_model_len=256,
    kv_cache_gib=0.02,
)


# ---- timing -------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, target_s: float, warmup: int = 2, min_iters: int = 3) -> float:
    """Mean ms per call of fn (device time: CUDA events around a run of calls), after warm-up.

    The number of calls is chosen from one probe call so that the run lasts about target_s."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    probe = time.perf_counter()
    fn()
    synchronize(device)
    once = time.perf_counter() - probe
    iters = max(min_iters, min(200, int(target_s / max(once, 1e-6))))
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def cuda_graph(fn, device: torch.device):
    """fn captured in a CUDA graph (replay: one launch for all its kernels, no Python per kernel),
    or fn itself off the GPU. Returns (callable, captured?)."""
    if device.type != "cuda":
        return fn, False
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up outside the graph: cuBLAS picks its kernels here
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay, True


def kernel_time_ms(fn, device: torch.device, target_s: float) -> tuple[float, bool]:
    """time_ms of fn replayed from a CUDA graph, so a short kernel is timed without its host-side
    launch cost; eager where capture fails (recorded as graphed False)."""
    try:
        runner, graphed = cuda_graph(fn, device)
    except Exception as exc:  # e.g. a host sync inside fn: time it eagerly instead
        print(f"  CUDA graph capture failed ({type(exc).__name__}: {exc}); timing eagerly", flush=True)
        runner, graphed = fn, False
    return time_ms(runner, device, target_s, warmup=3), graphed


# ---- building the engine ------------------------------------------------------------------------
def random_weights(hf_config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(HF name, tensor) pairs of a whole Llama checkpoint, each made on the device when asked for,
    so at most one layer's tensors exist beside the model (no 16 GB on the host or on disk)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    c = hf_config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    def rand(rows: int, cols: int) -> torch.Tensor:
        # std 0.02 (HF's initializer_range): activations stay finite through 32 layers
        return torch.empty(rows, cols, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)

    def ones() -> torch.Tensor:
        return torch.ones(c.hidden_size, device=device, dtype=dtype)

    yield "model.embed_tokens.weight", rand(c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", rand(q, c.hidden_size)
        yield p + "self_attn.k_proj.weight", rand(kv, c.hidden_size)
        yield p + "self_attn.v_proj.weight", rand(kv, c.hidden_size)
        yield p + "self_attn.o_proj.weight", rand(c.hidden_size, q)
        yield p + "mlp.gate_proj.weight", rand(c.intermediate_size, c.hidden_size)
        yield p + "mlp.up_proj.weight", rand(c.intermediate_size, c.hidden_size)
        yield p + "mlp.down_proj.weight", rand(c.hidden_size, c.intermediate_size)
        yield p + "input_layernorm.weight", ones()
        yield p + "post_attention_layernorm.weight", ones()
    yield "model.norm.weight", ones()
    yield "lm_head.weight", rand(c.vocab_size, c.hidden_size)


def matmul_weight_bytes(hf_config, element_size: int) -> int:
    """Bytes of every matrix a decode step multiplies by: all layers' linears + lm_head (the
    embedding is a gather of a few rows, so it is not counted)."""
    c = hf_config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return (c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size) * element_size


def build_random_engine(hf_config, backend_name: str, scale: Scale, dtype_name: str, gpu_mem: float,
                        **settings):
    """The engine splitfuse.assembly.build_engine would make, with random weights instead of a
    directory (settings: more EngineConfig fields); returns it and the time the model was built
    (before the KV cache)."""
    from splitfuse.assembly import assemble_engine
    from splitfuse.backends.selection import create_backend
    from splitfuse.config import EngineConfig
    from splitfuse.models.llama import LlamaForCausalLM
    from splitfuse.models.loader import resolve_dtype

    config = EngineConfig(token_budget=scale.token_budget, max_model_len=scale.max_model_len, dtype=dtype_name,
                          gpu_memory_utilization=gpu_mem, kv_cache_gib=scale.kv_cache_gib, **settings)
    backend = create_backend(backend_name)
    dtype = resolve_dtype(dtype_name, backend)
    model = LlamaForCausalLM(hf_config, backend, dtype, scale.max_model_len)
    model.load_weights(random_weights(hf_config, backend.device, dtype))
    synchronize(backend.device)
    built = time.perf_counter()
    engine = assemble_engine(model, backend, config)
    synchronize(backend.device)
    return engine, built


def greedy(max_new_tokens: int):
    from splitfuse.config import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)


class PlanLog:
    """What the engine's last step scheduled: wraps scheduler.schedule and summarises each plan when
    it is made (before the step moves num_computed on). The engine itself is untouched."""

    def __init__(self, engine) -> None:
        self.last: dict = {}
        schedule = engine.scheduler.schedule

        def recording():
            plan = schedule()
            self.last = self.summarise(plan)
            return plan

        engine.scheduler.schedule = recording

    @staticmethod
    def summarise(plan) -> dict:
        # a decode is one token of a sequence whose prompt is all in the cache
        decodes = [i for i in plan.items if i.sequence.num_computed >= i.sequence.num_prompt_tokens]
        chunks = [i for i in plan.items if i.sequence.num_computed < i.sequence.num_prompt_tokens]
        return dict(tokens=plan.num_tokens, decodes=len(decodes), chunk_tokens=sum(i.num_tokens for i in chunks),
                    chunk_context_starts=[i.sequence.num_computed for i in chunks],
                    sampled_rows=sum(1 for i in plan.items if i.samples),
                    max_context=max((i.sequence.num_computed + i.num_tokens for i in plan.items), default=0))


def drain(engine) -> None:
    """Abort whatever a failed section left in the engine."""
    engine.abort_all()


def run_to_completion(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Submit every prompt at once and step until all finished; wall time of the whole run."""
    device = engine.backend.device
    synchronize(device)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, greedy(new_tokens))
    steps = generated = 0
    while engine.has_unfinished():
        generated += len(engine.step())
        steps += 1
    synchronize(device)
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, steps=steps, generated_tokens=generated, requests=len(prompts),
                prompt_tokens=sum(map(len, prompts)), requests_per_s=len(prompts) / seconds,
                generated_tokens_per_s=generated / seconds)


# ---- sections -----------------------------------------------------------------------------------
class Bench:
    """Holds the run's state (engine, measured limits) and runs the sections in order."""

    def __init__(self, args) -> None:
        self.args = args
        self.scale = TINY if args.tiny else QUICK if args.quick else FULL
        if args.layers:
            self.hf_config = (tiny_config if args.tiny else llama3_8b_config)(args.layers)
        else:
            self.hf_config = tiny_config() if args.tiny else llama3_8b_config()
        self.out_path = Path(args.out) / "splitfuse.json"
        self.engine = None
        self.device = None
        self.results: dict = {"meta": self._meta(), "sections": {}}
        if args.only:  # a partial rerun keeps the other sections of the last run's file
            earlier = _read_json(self.out_path).get("sections", {})
            self.results["sections"] = earlier
            self.results["meta"]["kept_from_earlier_run"] = sorted(earlier)
        self.plans: PlanLog | None = None  # installed on the engine by the startup section
        self._matmul_cache: dict[tuple[int, int], tuple[float, bool]] = {}
        self.started = time.perf_counter()

    # -- plumbing --
    def _meta(self) -> dict:
        a = self.args
        meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
                    python=platform.python_version(), torch=torch.__version__, argv=sys.argv[1:],
                    backend=a.backend, tiny=a.tiny, quick=a.quick, git=_git_describe(),
                    triton_interpret=os.environ.get("TRITON_INTERPRET"))
        for mod in ("triton", "transformers"):
            try:
                meta[mod] = __import__(mod).__version__
            except Exception as exc:  # recorded, not fatal: the cpu backend runs without triton
                meta[mod] = f"unavailable: {exc}"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            meta.update(device=props.name, device_memory_gib=round(props.total_memory / GIB, 1),
                        sm_count=props.multi_processor_count, cuda=torch.version.cuda)
        else:
            meta["device"] = "cpu"
        return meta

    def save(self) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out_path)  # a kill mid-write never leaves half a file

    def section(self, name: str):
        return self.results["sections"].get(name) or {}

    def run(self, names: list[str]) -> int:
        failed = 0
        for name in names:
            elapsed = time.perf_counter() - self.started
            if self.args.budget_s and elapsed > self.args.budget_s and name != "summary":
                self.results["sections"][name] = {"skipped": f"time budget {self.args.budget_s}s spent"}
                print(f"[{name}] skipped: {elapsed:.0f}s of the {self.args.budget_s}s budget spent", flush=True)
                self.save()
                continue
            print(f"[{name}] ...", flush=True)
            t0 = time.perf_counter()
            try:
                result = getattr(self, "run_" + name)()
                result["section_s"] = round(time.perf_counter() - t0, 2)
                print(f"[{name}] {time.perf_counter() - t0:.1f}s: {_short(result)}", flush=True)
            except Exception as exc:  # recorded; the next sections still run
                failed += 1
                result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:],
                          "section_s": round(time.perf_counter() - t0, 2)}
                print(f"[{name}] FAILED: {result['error']}\n{result['traceback']}", flush=True)
                if self.engine is not None:
                    drain(self.engine)
                if self.device is not None and self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self.results["sections"][name] = result
            self.save()
        self.results["meta"]["total_s"] = round(time.perf_counter() - self.started, 1)
        self.save()
        return failed

    def need_engine(self):
        if self.engine is None:
            raise RuntimeError("no engine: the startup section failed or did not run")
        return self.engine

    def bw_gbps(self) -> float | None:
        return self.section("hardware").get("copy_GBps")

    def lower_bound_ms(self) -> float | None:
        return self.section("hardware").get("decode_lower_bound_ms")

    # -- hardware --
    def run_hardware(self) -> dict:
        device = self._device()
        n = self.scale.copy_bytes // 4
        src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device, max(self.scale.time_target_s, 0.2), warmup=3)
        del src, dst
        # a copy reads and writes every byte: 2 x size moved (the convention behind the 3.0 TB/s H100 copy figure)
        copy_gbps = 2 * n * 4 / (ms / 1e3) / GB
        element = torch.empty((), dtype=self._dtype()).element_size()
        weight_bytes = matmul_weight_bytes(self.hf_config, element)
        bound_ms = weight_bytes / (copy_gbps * GB) * 1e3
        return dict(copy_tensor_GiB=round(n * 4 / GIB, 2), copy_ms=round(ms, 3), copy_GBps=round(copy_gbps, 1),
                    matmul_weight_GB=round(weight_bytes / GB, 3), decode_lower_bound_ms=round(bound_ms, 3),
                    decode_upper_bound_tokens_per_s_batch1=round(1e3 / bound_ms, 1))

    def _device(self) -> torch.device:
        if self.device is None:
            interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
            cuda = self.args.backend == "cuda" and torch.cuda.is_available() and not interpreted
            self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return self.device

    def _dtype(self) -> torch.dtype:
        if self.args.dtype != "auto":
            return getattr(torch, self.args.dtype)
        return torch.bfloat16 if self._device().type == "cuda" else torch.float32

    # -- startup --
    def run_startup(self) -> dict:
        t0 = time.perf_counter()
        engine, built = build_random_engine(self.hf_config, self.args.backend, self.scale, self.args.dtype,
                                     self.args.gpu_mem)
        ready = time.perf_counter()
        self.engine, self.device = engine, engine.backend.device
        self.plans = PlanLog(engine)
        first = run_to_completion(engine, random_prompts([16], self.hf_config.vocab_size, 1), 2)
        model, settings = engine.model, engine.settings
        kv_gib = settings.num_kv_blocks * model.kv_bytes_per_block(settings.block_size) / GIB
        result = dict(backend=settings.backend, dtype=str(model.dtype), model_build_s=round(built - t0, 2),
                      kv_alloc_s=round(ready - built, 2), startup_s=round(ready - t0, 2),
                      first_request_s=round(first["seconds"], 2), kv_blocks=settings.num_kv_blocks,
                      kv_block_size=settings.block_size, kv_tokens=settings.num_kv_blocks * settings.block_size,
                      kv_GiB=round(kv_gib, 2), token_budget=engine.config.token_budget,
                      weights_GiB=round(sum(t.numel() * t.element_size() for t in model.weights.values()) / GIB, 2))
        graphs = getattr(engine.backend, "_graphs", None)
        result["cuda_graph_batches"] = sorted(graphs.buckets) if graphs is not None else []
        if self.device.type == "cuda":
            result["memory_allocated_GiB"] = round(torch.cuda.memory_allocated(self.device) / GIB, 2)
        return result

    # -- matmuls alone --
    def matmul_ms(self, tokens: int, sampled_rows: int) -> tuple[float, bool]:
        """ms of one step's linears alone: every layer's qkv, o, gate_up, down at `tokens` rows and
        the lm_head at `sampled_rows` rows, F.linear on the engine's weights (what backend.linear
        runs), captured in a CUDA graph so no launch gap or Python is counted."""
        key = (tokens, sampled_rows)
        if key not in self._matmul_cache:
            model = self.need_engine().model
            w = model.weights
            layers = [tuple(w[f"layers.{i}.{n}.weight"] for n in ("qkv", "o", "gate_up", "down"))
                      for i in range(model.num_layers)]
            head = w["lm_head.weight"] if "lm_head.weight" in w else w["embed_tokens.weight"]
            # one random input per in-feature size (hidden for qkv/gate_up/lm_head, q size for o,
            # intermediate for down): values do not change a matmul's time
            inputs = {m.shape[1]: torch.randn(tokens, m.shape[1], device=self.device, dtype=model.dtype)
                      for m in (*layers[0], head)}

            def step():
                for qkv, o, gate_up, down in layers:
                    F.linear(inputs[qkv.shape[1]], qkv)
                    F.linear(inputs[o.shape[1]], o)
                    F.linear(inputs[gate_up.shape[1]], gate_up)
                    F.linear(inputs[down.shape[1]], down)
                F.linear(inputs[head.shape[1]][:sampled_rows], head)

            self._matmul_cache[key] = kernel_time_ms(step, self.device, self.scale.time_target_s)
        return self._matmul_cache[key]

    def run_matmuls(self) -> dict:
        model = self.need_engine().model
        params_per_row = matmul_weight_bytes(self.hf_config, 1)  # multiply-adds per token row
        rows = {}
        for m in self.scale.matmul_tokens:
            ms, graphed = self.matmul_ms(m, m)
            row = dict(ms=round(ms, 3), cuda_graph=graphed, TFLOPs=round(2 * m * params_per_row / (ms / 1e3) / 1e12, 1))
            if self.lower_bound_ms():
                row["fraction_of_bw_limit"] = round(self.lower_bound_ms() / ms, 3)
            rows[str(m)] = row
        return dict(dtype=str(model.dtype), by_tokens=rows)

    # -- attention kernel alone --
    def run_attention(self) -> dict:
        device, dtype = self._device(), self._dtype()
        c = self.hf_config
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        attend = _attention_op(self.args.backend)
        block_size = self.engine.settings.block_size if self.engine else 16
        prefill = {f"{s}x{n}": self._attn_prefill(attend, s, n, H, Hkv, D, block_size, device, dtype)
                   for s, n in self.scale.attn_prefill}
        decode = {f"{s}x{n}": self._attn_decode(attend, s, n, H, Hkv, D, block_size, device, dtype)
                  for s, n in self.scale.attn_decode}
        return dict(heads=H, kv_heads=Hkv, head_dim=D, block_size=block_size, dtype=str(dtype),
                    prefill=prefill, decode=decode)

    def _attn_prefill(self, attend, seqs, length, H, Hkv, D, block_size, device, dtype) -> dict:
        """Dense causal prefill of `seqs` prompts of `length` tokens: the paged kernel on the cache vs
        SDPA on contiguous tensors holding the same K/V."""
        meta, kv, k, v = paged_batch([(length, length)] * seqs, Hkv, D, block_size, device, dtype)
        q = torch.randn(seqs * length, H, D, device=device, dtype=dtype)
        scale = D ** -0.5
        ours, graphed = kernel_time_ms(lambda: attend(q, kv, meta, scale), device, self.scale.time_target_s)
        qd = q.view(seqs, length, H, D).transpose(1, 2)  # [B, H, L, D] view: SDPA's layout
        sdpa = _time_sdpa(qd, k, v, H // Hkv, device, self.scale.time_target_s, causal=True, scale=scale)
        err = _max_diff(attend(q, kv, meta, scale), sdpa.pop("out"))
        flops = 2 * seqs * H * D * length * length  # QK^T and PV over the causal half: 2 x 2 x L^2/2
        best = min(ms for key, ms in sdpa.items() if key.endswith("_ms"))
        return dict(kernel_ms=round(ours, 3), cuda_graph=graphed, kernel_TFLOPs=round(flops / (ours / 1e3) / 1e12, 1),
                    **{key: round(ms, 3) for key, ms in sdpa.items()}, sdpa_best_ms=round(best, 3),
                    speed_vs_sdpa=round(best / ours, 3), max_abs_diff=err)

    def _attn_decode(self, attend, seqs, context, H, Hkv, D, block_size, device, dtype) -> dict:
        """One query per sequence over `context` cached tokens: bound by reading K and V once."""
        meta, kv, k, v = paged_batch([(context, 1)] * seqs, Hkv, D, block_size, device, dtype)
        q = torch.randn(seqs, H, D, device=device, dtype=dtype)
        scale = D ** -0.5
        ours, graphed = kernel_time_ms(lambda: attend(q, kv, meta, scale), device, self.scale.time_target_s)
        kv_bytes = 2 * seqs * context * Hkv * D * kv.element_size()
        result = dict(kernel_ms=round(ours, 4), cuda_graph=graphed, kv_read_GB=round(kv_bytes / GB, 3),
                      kernel_GBps=round(kv_bytes / (ours / 1e3) / GB, 1))
        if self.bw_gbps():
            result["fraction_of_copy_bw"] = round(kv_bytes / (ours / 1e3) / GB / self.bw_gbps(), 3)
        qd = q.view(seqs, 1, H, D).transpose(1, 2)
        sdpa = _time_sdpa(qd, k, v, H // Hkv, device, self.scale.time_target_s, causal=False, scale=scale)
        err = _max_diff(attend(q, kv, meta, scale), sdpa.pop("out"))
        result.update({key: round(ms, 4) for key, ms in sdpa.items()}, max_abs_diff=err)
        return result

    # -- decode, steady state --
    def run_decode(self) -> dict:
        engine = self.need_engine()
        return {str(b): self._decode_batch(engine, b) for b in self.scale.decode_batches}

    def _decode_batch(self, engine, batch: int) -> dict:
        s = self.scale
        for p in random_prompts([s.decode_prompt] * batch, self.hf_config.vocab_size, batch):
            engine.add_request(p, greedy(s.decode_warmup + 2 * s.decode_steps + 4))
        pending = set(engine.requests)
        while pending:  # prefill: until every request has its first token, i.e. is decoding
            pending -= {o.request_id for o in engine.step()}
        for _ in range(s.decode_warmup):
            engine.step()
        times = self._decode_steps(engine, batch)
        # the same steps op by op, to show what the decode CUDA graphs buy (if any were captured)
        graphs = getattr(engine.backend, "_graphs", None)
        eager_ms = None
        if graphs is not None and graphs.max_batch >= batch:
            engine.backend._graphs = None
            try:
                eager_ms = statistics.median(self._decode_steps(engine, batch)) * 1e3
            finally:
                engine.backend._graphs = graphs
        drain(engine)
        step_ms = statistics.median(times) * 1e3
        matmul_ms, _ = self.matmul_ms(batch, batch)
        result = dict(step_ms_median=round(step_ms, 3), step_ms_mean=round(statistics.fmean(times) * 1e3, 3),
                      tokens_per_s=round(batch * len(times) / sum(times), 1), steps=len(times),
                      context=s.decode_prompt + s.decode_warmup, matmul_alone_ms=round(matmul_ms, 3),
                      step_over_matmuls=round(step_ms / matmul_ms, 3))
        result["cuda_graph"] = eager_ms is not None
        if eager_ms is not None:
            result["eager_step_ms_median"] = round(eager_ms, 3)
            result["graph_speedup"] = round(eager_ms / step_ms, 3)
        if self.lower_bound_ms():
            result["fraction_of_bw_limit"] = round(self.lower_bound_ms() / step_ms, 3)
        return result

    def _decode_steps(self, engine, batch: int) -> list[float]:
        times = []
        for _ in range(self.scale.decode_steps):
            t0 = time.perf_counter()
            outputs = engine.step()  # ends in tokens.tolist(): the step's device work is done
            times.append(time.perf_counter() - t0)
            assert len(outputs) == batch, f"decode step gave {len(outputs)} tokens for batch {batch}"
        return times

    # -- generate: HF's workload, end to end --
    def run_generate(self) -> dict:
        engine, s = self.need_engine(), self.scale
        # a small run first, so the timed ones pay no JIT compile for prefill-chunk shapes
        run_to_completion(engine, random_prompts([s.gen_prompt] * 2, self.hf_config.vocab_size, 7), 2)
        out = {}
        for b in s.gen_batches:
            prompts = random_prompts([s.gen_prompt] * b, self.hf_config.vocab_size, 100 + b)
            r = run_to_completion(engine, prompts, s.gen_new)
            out[str(b)] = dict(seconds=round(r["seconds"], 3), steps=r["steps"],
                               tokens_per_s=round(r["generated_tokens_per_s"], 1))
        return dict(prompt=s.gen_prompt, new_tokens=s.gen_new, by_batch=out)

    # -- mixed SplitFuse step --
    def run_mixed(self) -> dict:
        """Decoders with ~2k contexts, then one long prompt whose chunks fill the rest of each step's
        budget at contexts 0, ~2k, ~4k, ...; each full mixed step is compared with its matmuls alone
        (same token count, same lm_head rows). The headline is the median over the steps whose chunk
        starts at a context of >= budget / 2 tokens and that fill the budget."""
        engine, s = self.need_engine(), self.scale
        plans = self.plans
        vocab = self.hf_config.vocab_size
        decoders = [engine.add_request(p, greedy(64 if not self.args.tiny else 8))
                    for p in random_prompts([s.mixed_decode_ctx] * s.mixed_decodes, vocab, 11)]
        pending = set(decoders)
        while pending:
            pending -= {o.request_id for o in engine.step()}
        engine.step()  # one decode-only step: all decoders are in steady state
        engine.add_request(random_prompts([s.mixed_prompt], vocab, 12)[0], greedy(1))
        steps = []
        while any(r not in decoders for r in engine.requests):
            t0 = time.perf_counter()
            engine.step()
            ms = (time.perf_counter() - t0) * 1e3
            plan = plans.last
            if plan["chunk_tokens"] and plan["decodes"]:
                matmul, _ = self.matmul_ms(plan["tokens"], plan["sampled_rows"])
                steps.append(dict(step_ms=round(ms, 3), matmul_alone_ms=round(matmul, 3),
                                  ratio=round(ms / matmul, 3), **plan))
        drain(engine)
        # headline: full-budget steps past the first chunk (which also pays one-time work: JIT for a
        # new shape, allocator growth) and before the prompt's short tail
        full = [st for st in steps if st["tokens"] == s.token_budget]
        deep = [st for st in full if min(st["chunk_context_starts"]) >= s.token_budget // 2] or full or steps
        return dict(token_budget=s.token_budget, decodes=s.mixed_decodes, decode_context=s.mixed_decode_ctx,
                    prompt=s.mixed_prompt, steps=steps,
                    ratio_median=round(statistics.median(st["ratio"] for st in deep), 3) if deep else None)

    # -- offline workload --
    def run_offline(self) -> dict:
        engine, s = self.need_engine(), self.scale
        vocab = self.hf_config.vocab_size
        lengths = offline_lengths(s)
        prompts = random_prompts(lengths, vocab, 0)
        # warm-up on a few requests of the same kind: the timed run pays no JIT compiles
        run_to_completion(engine, random_prompts(lengths[:4], vocab, 99), 2)
        r = run_to_completion(engine, prompts, s.offline_new)
        return dict(requests=len(prompts), prompt_tokens=r["prompt_tokens"], new_tokens_each=s.offline_new,
                    seconds=round(r["seconds"], 3), steps=r["steps"], requests_per_s=round(r["requests_per_s"], 3),
                    generated_tokens_per_s=round(r["generated_tokens_per_s"], 1))

    # -- weight-only quantized decode: W8A16 and W4A16 against the same model in 16 bits --
    def run_quantized(self) -> dict:
        """Batch-1 decode tokens/s of the model with its layers' matrices as they load (bf16 on a
        GPU), quantized at load to int8 (W8A16) and to int4 in groups of 128 (W4A16), one engine at
        a time: the main engine is released first (three 8B models with caches do not fit beside it).
        The LM head and embeddings stay in 16 bits, as in the quantized checkpoints."""
        self.release_engine()
        variants = {}
        for quantization in (None, "int8", "int4"):
            engine, _ = build_random_engine(self.hf_config, self.args.backend, self.scale, self.args.dtype,
                                            self.args.gpu_mem, quantization=quantization, max_seqs=1)
            try:
                variants[quantization or "unquantized"] = self._quantized_decode(engine)
            finally:
                del engine
                self.free_device_memory()
        base = variants["unquantized"]["tokens_per_s"]
        for name in ("int8", "int4"):
            variants[name]["speedup_vs_unquantized"] = round(variants[name]["tokens_per_s"] / base, 3)
        return dict(batch=1, prompt=self.scale.decode_prompt, steps=self.scale.decode_steps, **variants)

    def _quantized_decode(self, engine) -> dict:
        from splitfuse.quant import weight_bytes

        s = self.scale
        engine.add_request(random_prompts([s.decode_prompt], self.hf_config.vocab_size, 1)[0],
                           greedy(s.decode_warmup + s.decode_steps + 2))
        engine.step()  # the prompt and the first token
        for _ in range(s.decode_warmup):
            engine.step()
        times = self._decode_steps(engine, 1)
        drain(engine)
        step_ms = statistics.median(times) * 1e3
        return dict(weights_MiB=round(weight_bytes(engine.model.weights) / (1 << 20), 1), step_ms_median=round(step_ms, 3),
                    tokens_per_s=round(1e3 / step_ms, 1), backend=engine.backend.describe())

    def release_engine(self) -> None:
        """Drop the main engine (its weights, KV cache and graphs) and give its memory back."""
        self.engine = None
        self.plans = None
        self.free_device_memory()

    def free_device_memory(self) -> None:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- the GPU performance targets (docs/benchmarks.md) --
    def run_summary(self) -> dict:
        sec = self.results["sections"]
        hf = _read_json(Path(self.args.out) / "hf.json").get("sections", {})
        get = _getter(sec)
        hget = _getter(hf)
        targets = {}

        def target(name, value, op, bound, note=""):
            ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
            targets[name] = dict(value=None if value is None else round(value, 3), target=f"{op} {bound}",
                                 met=ok, **({"note": note} if note else {}))

        target("decode_b1_fraction_of_bw_limit", get("decode", "1", "fraction_of_bw_limit"), ">=", 0.8)
        # batch 64 in the full run; the largest batch both sides ran otherwise (--quick, --tiny)
        sf_gen, hf_gen = get("generate", "by_batch") or {}, hget("generate", "by_batch") or {}
        common = sorted((int(b) for b in set(sf_gen) & set(hf_gen)), reverse=True)
        if common:
            b = str(common[0])
            target(f"generate_b{b}_vs_hf", _ratio(sf_gen[b].get("tokens_per_s"), hf_gen[b].get("tokens_per_s")),
                   ">=", 10.0, "same prompts and lengths, tokens/s end to end")
        else:
            target("generate_b64_vs_hf", None, ">=", 10.0, "no batch measured by both")
        target("mixed_step_over_matmuls", get("mixed", "ratio_median"), "<=", 1.25)
        for case, r in (sec.get("attention", {}).get("prefill") or {}).items():
            target(f"attention_prefill_{case}_speed_vs_sdpa", r.get("speed_vs_sdpa"), ">=", 1.0)
        for case, r in (sec.get("attention", {}).get("decode") or {}).items():
            target(f"attention_decode_{case}_fraction_of_copy_bw", r.get("fraction_of_copy_bw"), ">=", 0.7)
        sf_off = get("offline", "requests_per_s")
        target("offline_vs_hf_continuous_batching", _ratio(sf_off, hget("offline_cb", "requests_per_s")), ">=", 5.0)
        target("offline_vs_hf_static_batches", _ratio(sf_off, hget("offline_static", "requests_per_s")), ">=", 5.0,
               "for information: the offline target is against continuous batching")
        target("startup_s", get("startup", "startup_s"), "<=", 60.0, "model + KV cache; CUDA graphs when captured")
        return dict(hf_json_found=bool(hf), targets=targets)


# ---- helpers ------------------------------------------------------------------------------------
def _attention_op(backend_name: str):
    """The backend's paged attention alone (no KV write, no rotary)."""
    if backend_name == "cuda":
        from splitfuse.backends.triton.paged_attention import paged_attention
    else:
        from splitfuse.backends.torch_ops import paged_attention
    return paged_attention


def paged_batch(specs, num_kv_heads, head_dim, block_size, device, dtype, seed=0):
    """BatchMeta + one layer's paged cache for sequences given as (context, new tokens), with
    random K/V scattered over shuffled blocks, and the same K/V dense as [S, Hkv, ctx, D] (all
    contexts equal) for SDPA."""
    from splitfuse.core.batch import BatchMeta

    gen = torch.Generator().manual_seed(seed)
    ctx = specs[0][0]
    assert all(c == ctx for c, _ in specs), "dense K/V need equal contexts"
    seqs, blocks_per_seq = len(specs), -(-ctx // block_size)
    table = torch.randperm(seqs * blocks_per_seq, generator=gen).view(seqs, blocks_per_seq).to(torch.int32)
    pos = torch.arange(ctx)
    slots = (table[:, pos // block_size].to(torch.int64) * block_size + pos % block_size)  # [S, ctx]
    k = torch.randn(seqs, num_kv_heads, ctx, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    kv = torch.empty(2, seqs * blocks_per_seq, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
    flat = kv.view(2, -1, num_kv_heads, head_dim)
    flat_slots = slots.reshape(-1).to(device)
    flat[0].index_copy_(0, flat_slots, k.transpose(1, 2).reshape(-1, num_kv_heads, head_dim))
    flat[1].index_copy_(0, flat_slots, v.transpose(1, 2).reshape(-1, num_kv_heads, head_dim))
    new = specs[0][1]
    assert all(n == new for _, n in specs)
    query_start = [i * new for i in range(seqs + 1)]
    new_pos = pos[ctx - new:].repeat(seqs)
    meta = BatchMeta(
        input_ids=torch.zeros(seqs * new, dtype=torch.int64), positions=new_pos,
        query_start=torch.tensor(query_start, dtype=torch.int32),
        context_lens=torch.full((seqs,), ctx, dtype=torch.int32), block_tables=table,
        slot_mapping=slots[:, ctx - new:].reshape(-1), token_seq=torch.arange(seqs).repeat_interleave(new),
        sample_index=torch.tensor(query_start[1:]) - 1, num_tokens=seqs * new, num_seqs=seqs, max_query_len=new,
        max_context_len=ctx, block_size=block_size, is_decode_only=new == 1, query_start_host=query_start,
        context_lens_host=[ctx] * seqs,
    ).to(device)
    return meta, kv, k, v


def _time_sdpa(q, k, v, groups, device, target_s, causal, scale) -> dict:
    """SDPA on the same work two ways: K/V repeated to every query head (what HF's sdpa path does)
    and, where torch supports it, enable_gqa (no repeat). Returns ms of each and one output."""
    out = {}
    k_rep, v_rep = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def repeated():
        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=causal, scale=scale)

    out["sdpa_repeat_kv_ms"], _ = kernel_time_ms(repeated, device, target_s)
    try:
        def gqa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)

        gqa()  # unsupported shows up here, outside any graph capture
        out["sdpa_gqa_ms"], _ = kernel_time_ms(gqa, device, target_s)
    except (TypeError, RuntimeError) as exc:  # older torch, or no kernel for it: the repeat one stands
        print(f"  sdpa enable_gqa unavailable: {exc}", flush=True)
    out["out"] = repeated()
    return out


def _max_diff(paged_out: torch.Tensor, sdpa_out: torch.Tensor) -> float:
    """Largest |difference| between the kernel's [T, H, D] and SDPA's [B, H, L, D] outputs of the
    same attention: a kernel that is wrong at real shapes shows up here, not only in its timing."""
    dense = sdpa_out.transpose(1, 2).reshape_as(paged_out)
    return float((paged_out.float() - dense.float()).abs().max())


def _ratio(a, b):
    return a / b if a is not None and b else None


def _getter(tree: dict):
    def get(*keys):
        node = tree
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    return get


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def _short(result: dict, limit: int = 300) -> str:
    text = json.dumps({k: v for k, v in result.items() if k not in ("steps", "traceback")}, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cuda", help="splitfuse backend (default cuda; cpu for a reference run)")
    p.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model and minimal sizes (CPU dry run)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and steps (a short GPU smoke run)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--gpu-mem", type=float, default=0.85,
                   help="gpu_memory_utilization of the engine (default 0.85: the attention section "
                        "needs a few GB of its own)")
    p.add_argument("--budget-s", type=float, default=0, help="skip the remaining sections after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out",
                   help="output folder (default $OUT or ./gpu_out)")
    return p.parse_args(argv)


def selected_sections(only: str) -> list[str]:
    if not only:
        return [s for s in SECTIONS if s not in OPT_IN]
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    # the measured limits and the engine are prerequisites of most sections
    if any(s not in ("hardware", "summary") for s in wanted):
        wanted.append("hardware")
    if NEEDS_ENGINE & set(wanted):
        wanted.append("startup")
    return [s for s in SECTIONS if s in wanted]


def main(argv=None) -> int:
    args = parse_args(argv)
    sections = selected_sections(args.only)
    bench = Bench(args)
    print(f"gpu_bench: {bench.results['meta'].get('device')} backend={args.backend} sections={','.join(sections)} "
          f"-> {bench.out_path}", flush=True)
    failed = bench.run(sections)
    for name, t in bench.results["sections"].get("summary", {}).get("targets", {}).items():
        met = "" if t.get("met") is None else "met" if t["met"] else "NOT met"
        print(f"  {name:48s} {t.get('value')!s:>10} (target {t['target']}) {met}")
    print(f"gpu_bench: {failed} section(s) failed; {bench.results['meta']['total_s']}s; wrote {bench.out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
