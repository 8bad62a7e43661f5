"""scripts/bench_vs_vllm.py without vLLM installed: its splitfuse half runs a tiny workload on the
demo model and reports it; the side-by-side part (ratios, greedy comparison) is checked with a
stand-in second engine, so the script cannot rot where CI has no vLLM."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TINY = ["--settle", "0", "--prompts", "3", "--min-len", "8", "--max-len", "24", "--new-tokens", "3", "--decode-prompt", "8",
        "--decode-tokens", "3", "--rounds", "2", "--threads", "1", "--copy-mib", "8"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_vs_vllm

    return bench_vs_vllm


def test_splitfuse_half_reports_every_workload(bench, capsys):
    assert bench.main(["--engines", "splitfuse", *TINY]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^CPU: .+, \d+ usable cores; flags:", out, flags=re.M)
    assert len(re.findall(r"^round \d/2: +splitfuse offline [\d.]+s decode [\d.]+ ms/token$", out, flags=re.M)) == 2
    assert "## splitfuse vs vLLM CPU: the embedded demo model (4.2M-parameter Llama), float32, 1 thread(s)" in out
    assert "- Offline: 3 prompts of 8-24 random token ids" in out
    assert "3 greedy new tokens each, EOS ignored" in out
    assert "- splitfuse settings: backend cpu, token_budget 768, prefix caching False" in out
    row = re.search(r"^\| splitfuse \| ([\d.]+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) \|$",
                    out, flags=re.M)
    assert row, out
    startup, best_s, median_s, best_tps, _, best_ms, median_ms = map(float, row.groups())
    assert startup > 0 and 0 < best_s <= median_s and best_ms <= median_ms
    # 3 prompts x 3 tokens in best_s, which is printed rounded to its last digit
    digits = row.group(2).partition(".")[2]
    half_unit = 0.5 * 10 ** -len(digits)
    assert 9 / (best_s + half_unit) - 1 <= best_tps <= 9 / max(best_s - half_unit, 1e-9) + 1
    assert re.search(r"^Copy bandwidth \(read \+ write\): 1 thread\(s\) [\d.]+ GB/s\. Batch-1 decode reads "
                     r"[\d.]+ MB of weights per token:$", out, flags=re.M)
    assert re.search(r"^- splitfuse: [\d.]+ GB/s at its best decode, \d+% of the 1-thread copy bandwidth$", out, flags=re.M)
    assert "splitfuse / vLLM" not in out  # no ratios with one engine
    assert "python scripts/bench_vs_vllm.py --engines splitfuse --settle 0 --prompts 3" in out


def test_side_by_side_reports_paired_ratios_and_greedy_agreement(bench, monkeypatch, capsys):
    class StandIn(bench.SplitfuseEngine):
        """A second engine that agrees with splitfuse except on the last offline prompt."""

        name = "vllm"

        def generate(self, prompts, new_tokens):
            out = super().generate(prompts, new_tokens)
            if len(prompts) == 3:
                out[-1] = out[-1][:1] + [t + 1 for t in out[-1][1:]]
            return out

    monkeypatch.setitem(bench.ENGINE_CLASSES, "vllm", StandIn)
    monkeypatch.setattr(bench, "require_vllm", lambda: "stand-in")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert bench.main(TINY) == 0
    out = capsys.readouterr().out
    # the first engine rotates from round to round
    assert re.search(r"^round 1/2: +splitfuse .* vllm ", out, flags=re.M)
    assert re.search(r"^round 2/2: +vllm .* splitfuse ", out, flags=re.M)
    ratios = r": best [\d.]+x, paired median [\d.]+x \(per round [\d.]+, [\d.]+\)$"
    assert re.search(r"^Offline throughput splitfuse / vLLM" + ratios, out, flags=re.M)
    assert re.search(r"^Decode ms/token vLLM / splitfuse" + ratios, out, flags=re.M)
    assert re.search(r"^Startup splitfuse / vLLM: [\d.]+x \(vLLM takes [\d.]+x as long\)$", out, flags=re.M)
    assert "Greedy tokens: 2/3 offline prompts match token for token" in out
    assert re.search(r"^  prompt 2 \(length \d+\) differs from token 1$", out, flags=re.M)
    assert "Batch-1 decode tokens: match (3 tokens)" in out
    assert "vllm 'stand-in'" not in out and ", vllm stand-in" in out
    # vLLM's CPU settings, set before it starts: the KV cache size and one core per thread
    assert (os.environ["VLLM_CPU_KVCACHE_SPACE"], os.environ["VLLM_CPU_OMP_THREADS_BIND"]) == ("1", "0")


def test_without_vllm_the_error_says_how_to_run_splitfuse_alone(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with pytest.raises(SystemExit, match=r"vllm is not importable .* or pass --engines splitfuse"):
        bench.main(TINY)


@pytest.mark.parametrize("argv, message", [
    (["--engines", "splitfuse,sglang"], "--engines: expected a comma-separated list from splitfuse,vllm"),
    (["--decode-tokens", "1"], "--decode-tokens must be >= 2"),
    (["--min-len", "50", "--max-len", "40"], r"--min-len \(50\) must be <= --max-len \(40\)"),
    (["--prompts", "0"], "--prompts must be >= 1"),
])
def test_bad_arguments_name_the_flag(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_quick_is_a_smaller_workload_that_flags_still_override(bench):
    args = bench.parse_args(["--quick", "--rounds", "3"])
    assert args.workload.prompts < bench.Workload().prompts and args.workload.rounds == 3


def test_decode_weight_bytes_counts_every_weight_of_a_tied_model_once(bench):
    # the demo model ties its LM head to the embeddings: decode reads each stored tensor once
    model = bench.DEMO_MODEL
    config = json.loads((model / "config.json").read_text())
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert bench.decode_weight_bytes(config, "bfloat16") == 2 * stored
    assert bench.decode_weight_bytes(config, "float32") == 4 * stored

