"""What `splitfuse bench` tells its reader: shortened workloads are reported, the figures say what
they measured, and third-party logs stay out of its output."""

from __future__ import annotations

import logging

from splitfuse.bench.plots import subtitle, write_plots
from splitfuse.bench.runner import quiet_third_party_logs
from splitfuse.bench.workloads import from_file, synthetic


def test_requests_shortened_to_the_max_length_are_marked():
    # FastGen's long prompts on a short model: ~2600-token prompts cannot fit 1024 tokens
    long = synthetic(20, prompt_len=2600, gen_len=60, variance=0.3, max_len=1024, vocab_size=50, seed=0)
    assert all(r.clipped for r in long) and max(len(r.prompt_ids) + r.gen_len for r in long) == 1024
    short = synthetic(20, prompt_len=30, gen_len=10, variance=0.0, max_len=1024, vocab_size=50, seed=0)
    assert not any(r.clipped for r in short)
    # the same draws as before the marking: the workload of a seed does not change
    again = synthetic(20, prompt_len=2600, gen_len=60, variance=0.3, max_len=1024, vocab_size=50, seed=0)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in long]


def test_file_prompts_cut_to_fit_are_marked(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 4}\n{"prompt": [1, 2], "max_tokens": 2}\n')
    cut, fits = from_file(jsonl, gen_len=10, variance=0.0, max_len=10, seed=0, tokenizer=None)
    assert cut.clipped and len(cut.prompt_ids) == 6
    assert not fits.clipped


def _point(clients: int) -> dict:
    dist = {"mean": 0.1, "p50": 0.1, "p90": 0.2, "p95": 0.2, "p99": 0.3}
    return {"mode": "closed", "clients": clients, "completed": 4, "request_throughput": 2.0 * clients,
            "output_throughput": 50.0 * clients, "e2e": dist, "itl": dist, "ttft": dist,
            "effective_throughput": {"2": 1.0}, "effective_throughput_cumulative": {"2": 0.5}}


def test_figures_name_model_workload_and_machine(tmp_path):
    results = {
        "options": {"model": "/models/demo_model"},
        "workload": {"prompt_len": 2600, "gen_len": 60, "requests_per_point": 32, "clipped_requests": 32,
                     "max_len": 1024},
        "machine": {"cpu": "AMD EPYC 7B13", "cpu_count": 2},
        "systems": {"splitfuse": {"points": [_point(1), _point(2)]}, "hf-static": {"points": [_point(1)]}},
    }
    title = subtitle(results)
    assert title == ("demo_model · prompts ~2600 / generations ~60 tokens, 32 requests per point "
                     "(32 shortened to max length 1024) · AMD EPYC 7B13, 2 cores")
    written = write_plots(results, tmp_path)
    assert sorted(p.name for p in written) == ["effective_throughput_closed.png", "latency_throughput_closed.png",
                                               "token_latency_closed.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_third_party_logs_are_silenced_for_the_run_only():
    noisy = logging.getLogger("ContinuousBatchingLogger")
    before = noisy.level
    with quiet_third_party_logs():
        assert not noisy.isEnabledFor(logging.ERROR)
    assert noisy.level == before
