#!/usr/bin/env python
"""cpu batch-1 decode tokens/s and weight memory of one random-weight Llama in float32, bfloat16,
and bfloat16 with its linear layers quantized at load to int8 and int4 (weight-only), side by side;
the quantized rows run splitfuse's native kernels ("int8", "int4") and torch's weight-only kernels
("int8-torch", "int4-torch": prepared with the native kernels off).

All engines are built first, then take decode steps in turn (see interleaved_tokens_per_s).
The model is 0.5B-shaped (Qwen2.5-0.5B's layers: hidden 896, 24 layers, 14 heads / 2 KV heads,
intermediate 4864) with a 32000-token vocabulary and an untied LM head, which stays in the model
dtype like the embeddings (only the layers' matrices are quantized). Weights are random tensors
streamed through the model's own `load_weights` (scripts/gpu_bench.py's generator); nothing is
downloaded or written to disk.

    OMP_NUM_THREADS=1 python scripts/bench_quantized_decode.py --new-tokens 32
    python scripts/bench_quantized_decode.py --tiny          # a 2-layer dry run

It also prints this machine's single-thread copy bandwidth and, per row, the weight bytes one
decode step streams divided by its time (layers and LM head; the embedding table is only indexed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time

import torch
from gpu_bench import random_weights  # scripts/ is on sys.path when this file is run

from splitfuse.assembly import assemble_engine
from splitfuse.backends.cpu import quantized
from splitfuse.backends.selection import create_backend
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.models.llama import LlamaForCausalLM
from splitfuse.models.loader import resolve_dtype
from splitfuse.quant import weight_bytes

# (dtype, quantization, kernels) per row; quantized rows run bfloat16 activations
VARIANTS = (("bfloat16", None, "native"), ("float32", None, "native"), ("bfloat16", "int8", "native"),
            ("bfloat16", "int4", "native"), ("bfloat16", "int8", "torch"), ("bfloat16", "int4", "torch"))
MAX_MODEL_LEN = 512


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    size = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32) if tiny else
            dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, head_dim=64))
    return LlamaConfig(vocab_size=32000, max_position_embeddings=MAX_MODEL_LEN, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"], **size)


@contextlib.contextmanager
def native_kernels_off(off: bool):
    """SPLITFUSE_NATIVE=0 inside (when `off`): the cpu backend prepares weights for torch's kernels,
    which then run them whatever the setting at call time."""
    saved = os.environ.get("SPLITFUSE_NATIVE")
    if off:
        os.environ["SPLITFUSE_NATIVE"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SPLITFUSE_NATIVE", None)
        else:
            os.environ["SPLITFUSE_NATIVE"] = saved


def build_engine(hf_config, dtype_name: str, quantization: str | None, prompt_len: int, new_tokens: int,
                 extra_steps: int = 0, kernels: str = "native"):
    """An engine holding the model and one prompt, already prefilled, with new_tokens + extra_steps
    decode steps to go; returns (engine, weight MiB, MiB a decode step reads)."""
    backend = create_backend("cpu")
    config = EngineConfig(dtype=dtype_name, quantization=quantization, max_model_len=MAX_MODEL_LEN,
                          kv_cache_gib=0.05)
    dtype = resolve_dtype(dtype_name, backend)
    model = LlamaForCausalLM(hf_config, backend, dtype, MAX_MODEL_LEN)
    with native_kernels_off(kernels == "torch"):
        model.load_weights(random_weights(hf_config, backend.device, dtype))
        engine = assemble_engine(model, backend, config)
    prompt = [random.Random(0).randrange(hf_config.vocab_size) for _ in range(prompt_len)]
    engine.add_request(prompt, SamplingParams(max_new_tokens=new_tokens + extra_steps + 1, temperature=0.0,
                                              ignore_eos=True))
    engine.step()  # the prompt and the first token
    total = weight_bytes(model.weights)
    embedding = model.weights["embed_tokens.weight"]  # untied: one row per token is read
    return engine, total / (1 << 20), (total - embedding.numel() * embedding.element_size()) / (1 << 20)


class CopyProbe:
    """Takes its turn among the engines: one torch copy of a 256 MiB tensor per "step", so that the
    machine's single-thread copy bandwidth is measured in the same conditions as the decode steps
    (bytes copied per second; as many are written as read)."""

    def __init__(self, mib: int = 256):
        self.src = torch.ones(mib << 20, dtype=torch.uint8)
        self.dst = torch.empty_like(self.src)

    def step(self) -> None:
        self.dst.copy_(self.src)

    def gb_per_s(self, steps_per_s: float) -> float:
        return self.src.numel() * steps_per_s / 1e9


def interleaved_tokens_per_s(engines: list, new_tokens: int) -> list[float]:
    """Batch-1 decode tokens/s of each engine from the median of `new_tokens` steps, the engines
    taking turns step by step, so that a shared machine's slow spells fall on all of them alike."""
    step_s = [[] for _ in engines]
    for _ in range(new_tokens):
        for engine, times in zip(engines, step_s):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
    return [1 / statistics.median(times) for times in step_s]


# torch ops by what a decode step spends its time on
WEIGHT_ONLY_KERNELS = ("aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")
DENSE_MATMULS = ("aten::mm", "aten::addmm")


NATIVE_KERNELS = ("run_native",)  # in splitfuse.backends.cpu.quantized: every native call


@contextlib.contextmanager
def native_kernel_timer(seconds: list[float]):
    """Adds the time spent in the native weight-only kernels to seconds[0] (the profiler does not
    see them: they are not torch ops)."""
    originals = {name: getattr(quantized, name) for name in NATIVE_KERNELS}

    def timed(kernel):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = kernel(*args, **kwargs)
            seconds[0] += time.perf_counter() - start
            return out
        return call

    for name, kernel in originals.items():
        setattr(quantized, name, timed(kernel))
    try:
        yield
    finally:
        for name, kernel in originals.items():
            setattr(quantized, name, kernel)


def profile_step_ms(engine, steps: int) -> dict[str, float]:
    """Milliseconds per decode step in weight-only kernels (torch's or splitfuse's native ones), in
    dense matmuls (float layers and the LM head), and in everything else (attention, norms, rotary,
    sampling, Python): the step's wall time less the first two (torch.profiler self times)."""
    from torch.profiler import ProfilerActivity, profile

    native_s = [0.0]
    with profile(activities=[ProfilerActivity.CPU]) as prof, native_kernel_timer(native_s):
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall_ms = (time.perf_counter() - start) * 1000 / steps
    events = prof.key_averages()
    weight_only = (sum(e.self_cpu_time_total for e in events if e.key in WEIGHT_ONLY_KERNELS) / 1000
                   + native_s[0] * 1000) / steps
    dense = sum(e.self_cpu_time_total for e in events if e.key in DENSE_MATMULS) / 1000 / steps
    return {"weight-only kernels": weight_only, "dense matmuls": dense, "other": wall_ms - weight_only - dense}


def layer_matmul_ms(hf_config, copies: int = 8) -> dict[str, dict[str, float]]:
    """One batch-1 matmul of each layer matrix shape (fused qkv, o, fused gate/up, down) through
    the cpu backend's linear, bf16 dense vs int8 vs int4 (native and torch's kernels), ms from the
    median of passes over `copies` different matrices (more bytes than the CPU caches, as in a
    decode step)."""
    from splitfuse.quant import quantize

    backend = create_backend("cpu")
    c = hf_config
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    shapes = {"qkv": (qkv, c.hidden_size), "o": (c.hidden_size, c.num_attention_heads * c.head_dim),
              "gate_up": (2 * c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size)}
    results = {}
    for name, (N, K) in shapes.items():
        dense = [torch.randn(N, K).mul_(0.02).bfloat16() for _ in range(copies)]
        weights = {"bfloat16": dense}
        for kernels in ("native", "torch"):
            with native_kernels_off(kernels == "torch"):
                for f in ("int8", "int4"):
                    label = f if kernels == "native" else f"{f}-torch"
                    weights[label] = [backend.prepare_linear_weight(quantize(w, f)) for w in dense]
        x = torch.randn(1, K).bfloat16()
        results[name] = {}
        for label, ws in weights.items():
            passes = []
            for _ in range(5):
                start = time.perf_counter()
                for w in ws:
                    backend.linear(x, w)
                passes.append((time.perf_counter() - start) * 1000 / copies)
            results[name][label] = statistics.median(passes)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per variant")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script runs")
    parser.add_argument("--variants", default=",".join(_label(*v) for v in VARIANTS),
                        help="comma-separated subset of the rows to run; bfloat16 always runs (the ratios' base)")
    parser.add_argument("--kernels", action="store_true",
                        help="also time one matmul per layer shape: bf16 dense vs int8 vs int4 kernels")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="then profile this many more decode steps per row: where a step's time goes")
    args = parser.parse_args(argv)
    variants = _selected_variants(args.variants)
    hf_config = llama_config(args.tiny)
    print(f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}; batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} decode steps; int8/int4 rows: weight-only, bfloat16 activations")
    print(f"{'weights':<18}{'weight MiB':>12}{'tokens/s (median step)':>24}{'vs bfloat16':>13}")
    built = [build_engine(hf_config, d, q, args.prompt_len, args.new_tokens, args.profile, k) for d, q, k in variants]
    probe = CopyProbe()
    *tokens_per_s, copies_per_s = interleaved_tokens_per_s([engine for engine, _, _ in built] + [probe], args.new_tokens)
    for variant, (_, weights_mib, _), rate in zip(variants, built, tokens_per_s):
        print(f"{_label(*variant):<18}{weights_mib:>12.1f}{rate:>24.2f}{rate / tokens_per_s[0]:>12.2f}x")
    copy = probe.gb_per_s(copies_per_s)
    print(f"\nweights a decode step reads (layers, LM head) x tokens/s, against one thread's copy bandwidth "
          f"(torch copy of 256 MiB, taking turns with the steps: {copy:.1f} GB/s)")
    for variant, (_, _, read_mib), rate in zip(variants, built, tokens_per_s):
        read = read_mib * (1 << 20) * rate / 1e9
        print(f"{_label(*variant):<18}{read_mib:>8.1f} MiB/step{read:>8.2f} GB/s{read / copy:>6.0%} of copy")
    if args.kernels:
        print("\nms per batch-1 matmul (cold weights), and speed-up over bfloat16")
        for name, times in layer_matmul_ms(hf_config).items():
            print(f"{name:<10}" + "".join(f"  {label} {ms:.3f} ({times['bfloat16'] / ms:.2f}x)"
                                          for label, ms in times.items()))
    if args.profile:
        print(f"\nms per decode step (torch.profiler, {args.profile} steps each; the profiler adds to 'other')")
        for variant, (engine, _, _) in zip(variants, built):
            parts = profile_step_ms(engine, args.profile)
            total = sum(parts.values())
            print(f"{_label(*variant):<18}" + "".join(
                f"  {name} {ms:.1f} ({ms / total:.0%})" for name, ms in parts.items()) + f"  total {total:.1f}")
    return 0


def _label(dtype_name: str, quantization: str | None, kernels: str = "native") -> str:
    if quantization is None:
        return dtype_name
    return quantization if kernels == "native" else f"{quantization}-{kernels}"


def _selected_variants(names: str) -> list[tuple[str, str | None, str]]:
    """The VARIANTS named in `names`, bfloat16 (the ratios' base) first."""
    by_label = {_label(*v): v for v in VARIANTS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_label]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected names from {list(by_label)}")
    return [by_label["bfloat16"]] + [by_label[n] for n in wanted if n != "bfloat16"]


if __name__ == "__main__":
    raise SystemExit(main())
