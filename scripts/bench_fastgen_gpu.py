#!/usr/bin/env python
"""FastGen's benchmark on a GPU: splitfuse against HF transformers on the Llama-3-8B shape.

A random-weight bf16 Llama-3-8B (config from scripts/gpu_bench.py, weights drawn on the GPU) is saved
once as safetensors to a scratch directory, then `splitfuse bench` runs on it: FastGen's workload
(prompt ~ N(2600, 30%), 60 new tokens), closed loop over concurrent clients, splitfuse's server
(backend cuda, measured over HTTP) then the HF baselines (static `generate` batches and
transformers' continuous batching, bf16, sdpa). Prompts are token ids; the model directory gets a
word-level tokenizer ("t0" .. "t128255") only so that the server streams every token as text.
Writes $OUT/fastgen/results.json, its plots and $OUT/fastgen/summary.json (OUT defaults to ./gpu_out).

    python scripts/bench_fastgen_gpu.py                            # H100: about 6-8 minutes
    python scripts/bench_fastgen_gpu.py --clients 1,4,16 --requests 32 --workload 1200:128
    python scripts/bench_fastgen_gpu.py --tiny                     # CPU dry run, 2-layer model, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import llama3_8b_config, tiny_config

from splitfuse.bench import BenchOptions, run


def build_model_dir(path: Path, tiny: bool, device: str) -> Path:
    """Random-weight model saved as safetensors (bf16 on a GPU, fp32 for the CPU dry run)."""
    from transformers import AutoModelForCausalLM

    if (path / "config.json").is_file():
        return path
    config = tiny_config() if tiny else llama3_8b_config()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, max_shard_size="5GB")
    word_tokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id).save_pretrained(path)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    print(f"model written to {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return path


def word_tokenizer(vocab_size: int, bos_id: int, eos_id: int):
    """A tokenizer whose every id decodes to a word ("t123"), so the server streams each token as
    it is made; a model directory without one streams no text until the end."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"t{bos_id}", eos_token=f"t{eos_id}",
                                   unk_token="t0")


def summarize(results: dict) -> dict:
    """Effective throughput of splitfuse over each HF baseline at every client count and SLA rate."""
    systems = results["systems"]
    ours = {p["clients"]: p for p in systems.get("splitfuse", {}).get("points", [])}
    summary = {}
    for name in ("hf", "hf_cb"):
        theirs = {p["clients"]: p for p in systems.get(name, {}).get("points", [])}
        rows = {}
        for clients in sorted(set(ours) & set(theirs)):
            a, b = ours[clients], theirs[clients]
            rows[str(clients)] = {
                "request_throughput": [a["request_throughput"], b["request_throughput"]],
                "effective_throughput": {r: [a["effective_throughput"][r], b["effective_throughput"][r]]
                                         for r in a["effective_throughput"]},
                "itl_p95_s": [a["itl"]["p95"], b["itl"]["p95"]],
            }
        if rows:
            summary[f"splitfuse_vs_{name}"] = rows
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model, cpu backend, minimal sizes")
    p.add_argument("--clients", default=None, help="comma-separated (default 1,2,4,8,16,32; tiny: 1,2)")
    p.add_argument("--requests", type=int, default=None, help="requests per point (default 32; tiny: 4)")
    p.add_argument("--workload", default="2600:60", help="PROMPT:GEN mean lengths (FastGen: 2600:60, 1200:128)")
    p.add_argument("--baseline", default="hf", help="hf, hf-static, hf-cb or '' for splitfuse alone")
    p.add_argument("--model-dir", default=None, help="scratch directory for the model (default: a temp dir)")
    args = p.parse_args()

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        print("no GPU here: running the --tiny dry run instead", file=sys.stderr)
        args.tiny = True
    prompt_len, gen_len = (int(x) for x in args.workload.split(":"))
    if args.tiny:
        prompt_len, gen_len = min(prompt_len, 96), min(gen_len, 8)
    clients = [int(c) for c in (args.clients or ("1,2" if args.tiny else "1,2,4,8,16,32")).split(",")]
    out = Path(os.environ.get("OUT", "gpu_out")) / "fastgen"
    scratch = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="splitfuse-llama3-8b-"))
    try:
        return run_bench(args, scratch, device, prompt_len, gen_len, clients, out)
    finally:
        if not args.model_dir:
            shutil.rmtree(scratch, ignore_errors=True)  # 16 GB of random weights


def run_bench(args, scratch: Path, device: str, prompt_len: int, gen_len: int, clients: list[int], out: Path) -> int:
    model_dir = build_model_dir(scratch, args.tiny, device)

    options = BenchOptions(
        out=str(out), model=str(model_dir), backend="cpu" if args.tiny else "cuda",
        engine={} if args.tiny else {"token_budget": 2048, "gpu_memory_utilization": 0.85},
        baselines=[b for b in args.baseline.split(",") if b], clients=clients,
        requests=args.requests or (4 if args.tiny else 32), warmup=2, prompt_len=prompt_len, gen_len=gen_len,
        max_len=4096 if not args.tiny else None, hf_device=device, hf_dtype="float32" if args.tiny else "bfloat16",
        progress=sys.stderr.isatty(),
    )
    results = run(options)
    summary = {"device": results["machine"].get("gpu", "cpu"), "date": results["date"],
               "workload": f"prompt ~ N({prompt_len}, 30%), gen ~ N({gen_len}, 30%)", **summarize(results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=1))
    failed = [name for name, s in results["systems"].items() if "error" in s]
    for name in failed:
        print(f"{name} failed: {results['systems'][name]['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
