#!/usr/bin/env python
"""The HF transformers baseline for scripts/gpu_bench.py: the same Llama-3-8B shape with random
weights (bf16, sdpa attention), built with `from_config` directly on the GPU (no download, no disk).
Writes $OUT/hf.json (OUT defaults to ./gpu_out), which gpu_bench.py's summary reads.

Run it in its own process before gpu_bench.py: the model and its caches take tens of GB that this
process then gives back by exiting.

Sections (`--only a,b`):
  generate        `generate`, prompt 512 + 128 new tokens (greedy, EOS never stops it), batch 64,
                  16, 1 (largest first: a timeout then drops the least informative, slowest one).
  offline_static  the FastGen-like workload of gpu_bench.py (same prompt lengths, same seed): static
                  `generate` batches of 8 in arrival order, left padded.
  offline_cb      the same requests through transformers' continuous batching (`generate_batch`,
                  paged|sdpa attention), the baseline of the offline throughput target.

    python scripts/gpu_bench_hf.py
    python scripts/gpu_bench_hf.py --only generate
    python scripts/gpu_bench_hf.py --tiny            # CPU dry run, float32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_bench.py beside this file
from gpu_bench import (  # noqa: E402
    FULL, QUICK, TINY, Scale, llama3_8b_config, offline_lengths, random_prompts, tiny_config,
)

SECTIONS = ("generate", "offline_static", "offline_cb")
PAD_ID = 0
STATIC_BATCH = 8


def build_model(hf_config, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    """Random-weight HF model made on `device` (under a device context: no host copy of 16 GB)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Greedy generate of exactly new_tokens per prompt; prompts of unequal length are left padded."""
    device = model.device
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p)
        mask[row, longest - len(p):] = 1
    return model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD_ID)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


class HFBench:
    def __init__(self, args) -> None:
        self.args = args
        self.scale: Scale = TINY if args.tiny else QUICK if args.quick else FULL
        self.hf_config = (tiny_config if args.tiny else llama3_8b_config)(args.layers)
        self.device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.out_path = Path(args.out) / "hf.json"
        self.model = None
        self.results = {"meta": self._meta(), "sections": {}}
        self.started = time.perf_counter()

    def _meta(self) -> dict:
        import transformers

        meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
                    torch=torch.__version__, transformers=transformers.__version__, argv=sys.argv[1:],
                    dtype=str(self.dtype), attn_implementation="sdpa")
        meta["device"] = torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu"
        return meta

    def save(self) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out_path)

    def run(self, names: list[str]) -> int:
        failed = 0
        t0 = time.perf_counter()
        try:
            self.model = build_model(self.hf_config, self.device, self.dtype)
            synchronize(self.device)
            self.results["meta"]["model_build_s"] = round(time.perf_counter() - t0, 2)
            generate(self.model, random_prompts([16, 16], self.hf_config.vocab_size, 5), 4)  # warm-up
        except Exception as exc:
            self.results["meta"]["error"] = f"model build failed: {type(exc).__name__}: {exc}"
            self.results["meta"]["traceback"] = traceback.format_exc()[-4000:]
            print(self.results["meta"]["traceback"], flush=True)
            self.save()
            return len(names)
        for name in names:
            if self.args.budget_s and time.perf_counter() - self.started > self.args.budget_s:
                self.results["sections"][name] = {"skipped": f"time budget {self.args.budget_s}s spent"}
                print(f"[hf {name}] skipped: time budget spent", flush=True)
                self.save()
                continue
            print(f"[hf {name}] ...", flush=True)
            t0 = time.perf_counter()
            try:
                result = getattr(self, "run_" + name)()
                print(f"[hf {name}] {time.perf_counter() - t0:.1f}s: {json.dumps(result)[:300]}", flush=True)
            except Exception as exc:  # recorded; the next sections still run
                failed += 1
                result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
                print(f"[hf {name}] FAILED: {result['error']}\n{result['traceback']}", flush=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            result["section_s"] = round(time.perf_counter() - t0, 2)
            self.results["sections"][name] = result
            self.save()
        self.results["meta"]["total_s"] = round(time.perf_counter() - self.started, 1)
        self.save()
        return failed

    def run_generate(self) -> dict:
        s = self.scale
        out = {}
        for b in sorted(s.gen_batches, reverse=True):
            prompts = random_prompts([s.gen_prompt] * b, self.hf_config.vocab_size, 100 + b)
            seconds = timed(lambda: generate(self.model, prompts, s.gen_new), self.device)
            out[str(b)] = dict(seconds=round(seconds, 3), tokens_per_s=round(b * s.gen_new / seconds, 1))
            print(f"  batch {b}: {out[str(b)]}", flush=True)
        return dict(prompt=s.gen_prompt, new_tokens=s.gen_new, by_batch=out)

    def _offline_prompts(self) -> list[list[int]]:
        return random_prompts(offline_lengths(self.scale), self.hf_config.vocab_size, 0)  # as gpu_bench.py

    def run_offline_static(self) -> dict:
        prompts, new = self._offline_prompts(), self.scale.offline_new

        def run():
            for i in range(0, len(prompts), STATIC_BATCH):
                generate(self.model, prompts[i:i + STATIC_BATCH], new)

        seconds = timed(run, self.device)
        return dict(requests=len(prompts), prompt_tokens=sum(map(len, prompts)), new_tokens_each=new,
                    batch=STATIC_BATCH, seconds=round(seconds, 3), requests_per_s=round(len(prompts) / seconds, 3))

    def run_offline_cb(self) -> dict:
        """transformers' continuous batching: the model's attention switched to its paged variant
        (set_attn_implementation, so no second 16 GB model is built)."""
        from transformers import GenerationConfig

        prompts, new = self._offline_prompts(), self.scale.offline_new
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the paged cache is sized from free memory: hand back generate's
        self.model.set_attn_implementation("paged|sdpa")
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=-1,
                                  pad_token_id=PAD_ID)
        try:
            with torch.inference_mode():
                outputs = {}
                seconds = timed(lambda: outputs.update(
                    self.model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)),
                    self.device)
        finally:
            self.model.set_attn_implementation("sdpa")
        generated = sum(len(o.generated_tokens) for o in outputs.values())
        return dict(requests=len(prompts), completed=len(outputs), generated_tokens=generated, new_tokens_each=new,
                    seconds=round(seconds, 3), requests_per_s=round(len(prompts) / seconds, 3),
                    attn_implementation="paged|sdpa")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model on the CPU (dry run)")
    p.add_argument("--quick", action="store_true", help="fewer sizes (a short GPU smoke run)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--budget-s", type=float, default=0, help="skip the remaining sections after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out",
                   help="output folder (default $OUT or ./gpu_out)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    bench = HFBench(args)
    print(f"gpu_bench_hf: {bench.results['meta']['device']} sections={','.join(names)} -> {bench.out_path}", flush=True)
    failed = bench.run(names)
    print(f"gpu_bench_hf: {failed} section(s) failed; {bench.results['meta'].get('total_s')}s; wrote {bench.out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
