#!/usr/bin/env python
"""cpu batch-1 decode tokens/s and weight memory of one random-weight Llama in float32, bfloat16,
and bfloat16 with its linear layers quantized at load to int8 and int4 (weight-only), side by side.

The model is 0.5B-shaped (Qwen2.5-0.5B's layers: hidden 896, 24 layers, 14 heads / 2 KV heads,
intermediate 4864) with a 32000-token vocabulary and an untied LM head, which stays in the model
dtype like the embeddings (only the layers' matrices are quantized). Weights are random tensors
streamed through the model's own `load_weights` (scripts/gpu_bench.py's generator); nothing is
downloaded or written to disk.

    OMP_NUM_THREADS=1 python scripts/bench_quantized_decode.py --new-tokens 32
    python scripts/bench_quantized_decode.py --tiny          # a 2-layer dry run
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from gpu_bench import random_weights  # scripts/ is on sys.path when this file is run

from splitfuse.assembly import assemble_engine
from splitfuse.backends.selection import create_backend
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.models.llama import LlamaForCausalLM
from splitfuse.models.loader import resolve_dtype
from splitfuse.quant import weight_bytes

# (dtype, quantization) per row; quantized rows run bfloat16 activations
VARIANTS = (("bfloat16", None), ("float32", None), ("bfloat16", "int8"), ("bfloat16", "int4"))
MAX_MODEL_LEN = 512


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    size = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32) if tiny else
            dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, head_dim=64))
    return LlamaConfig(vocab_size=32000, max_position_embeddings=MAX_MODEL_LEN, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"], **size)


def decode_tokens_per_s(hf_config, dtype_name: str, quantization: str | None, prompt_len: int,
                        new_tokens: int) -> dict:
    """Build the engine, prefill one prompt, then time `new_tokens` batch-1 decode steps: tokens/s
    of the median step."""
    backend = create_backend("cpu")
    config = EngineConfig(dtype=dtype_name, quantization=quantization, max_model_len=MAX_MODEL_LEN,
                          kv_cache_gib=0.05)
    dtype = resolve_dtype(dtype_name, backend)
    model = LlamaForCausalLM(hf_config, backend, dtype, MAX_MODEL_LEN)
    model.load_weights(random_weights(hf_config, backend.device, dtype))
    engine = assemble_engine(model, backend, config)
    prompt = [random.Random(0).randrange(hf_config.vocab_size) for _ in range(prompt_len)]
    engine.add_request(prompt, SamplingParams(max_new_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True))
    engine.step()  # the prompt and the first token
    step_s = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - start)
    # the median step: a shared machine's stalls move the mean, not the median
    return dict(weights_mib=weight_bytes(model.weights) / (1 << 20), tokens_per_s=1 / statistics.median(step_s))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per variant")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script runs")
    parser.add_argument("--variants", default=",".join(_label(*v) for v in VARIANTS),
                        help="comma-separated subset of the rows to run; bfloat16 always runs (the ratios' base)")
    args = parser.parse_args(argv)
    variants = _selected_variants(args.variants)
    hf_config = llama_config(args.tiny)
    print(f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}; batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} decode steps; int8/int4 rows: weight-only, bfloat16 activations")
    print(f"{'weights':<18}{'weight MiB':>12}{'tokens/s (median step)':>24}{'vs bfloat16':>13}")
    base = None
    for dtype_name, quantization in variants:
        result = decode_tokens_per_s(hf_config, dtype_name, quantization, args.prompt_len, args.new_tokens)
        base = base or result["tokens_per_s"]  # bfloat16 runs first
        print(f"{_label(dtype_name, quantization):<18}{result['weights_mib']:>12.1f}{result['tokens_per_s']:>24.2f}"
              f"{result['tokens_per_s'] / base:>12.2f}x", flush=True)
    return 0


def _label(dtype_name: str, quantization: str | None) -> str:
    return dtype_name if quantization is None else f"{quantization}"


def _selected_variants(names: str) -> list[tuple[str, str | None]]:
    """The VARIANTS named in `names`, bfloat16 (the ratios' base) first."""
    by_label = {_label(*v): v for v in VARIANTS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_label]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected names from {list(by_label)}")
    return [by_label["bfloat16"]] + [by_label[n] for n in wanted if n != "bfloat16"]


if __name__ == "__main__":
    raise SystemExit(main())
