"""Benchmark metrics on synthetic token timelines, against answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from splitfuse.bench import metrics
from splitfuse.bench.metrics import RequestRecord
from splitfuse.bench.workloads import from_file, synthetic


def rec(prompt_tokens: int, times: list[float], start: float = 0.0, error: str | None = None) -> RequestRecord:
    return RequestRecord(prompt_tokens=prompt_tokens, start=start, token_times=times, error=error)


def test_per_request_latencies():
    r = rec(10, [1.0, 2.0, 4.0], start=0.0)
    assert (r.ttft, r.e2e, r.itl, r.output_tokens) == (1.0, 4.0, [1.0, 2.0], 3)
    assert r.tpot == 1.5  # (4 - 1) / (3 - 1)
    assert rec(10, [0.5]).tpot is None


def test_percentiles_are_numpy_linear():
    s = metrics.summarize([4.0, 1.0, 3.0, 2.0])
    # sorted 1,2,3,4: rank p/100 * 3, interpolated between neighbours
    assert s == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p95": 3.85, "p99": 3.97})
    assert metrics.summarize([]) == {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None}


def test_ema_span_16_matches_pandas_adjusted_weights():
    # alpha = 2/17, decay = 15/17; adjust=True: sum(decay^k x_{t-k}) / sum(decay^k)
    assert metrics.ema([1.0, 0.0]) == pytest.approx([1.0, 15 / 32])
    assert metrics.ema([0.0, 1.0]) == pytest.approx([0.0, 17 / 32])
    assert metrics.ema([1.0, 0.0, 0.0]) == pytest.approx([1.0, 15 / 32, 225 / 769])
    # another span gives other weights: the span is really used
    assert metrics.ema([1.0, 0.0], span=3) == pytest.approx([1.0, 1 / 3])


def test_ttft_sla_met_exactly_at_the_boundary():
    # 256 prompt tokens / 512 tokens/s = 0.5 s allowed for the first token
    assert metrics.meets_sla(rec(256, [0.5, 0.75]), rate=2)
    assert not metrics.meets_sla(rec(256, [0.5 + 1e-9, 0.75]), rate=2)
    assert metrics.meets_sla(rec(512, [1.0, 1.25]), rate=2)


def test_token_sla_is_strictly_below_one_over_rate():
    r = rec(256, [0.25, 0.5])  # one gap of 0.25 s: EMA = 0.25
    assert not metrics.meets_sla(r, rate=4)  # 0.25 is not below 1/4
    assert metrics.meets_sla(r, rate=3.99)
    assert metrics.meets_sla(rec(256, [0.25]), rate=6)  # one token: nothing to average


def test_ema_smooths_a_single_slow_token():
    # gaps 0.125 then 0.5: EMA = (15/17 * 0.125 + 0.5) / (32/17) = 0.32421875
    r = rec(256, [0.125, 0.25, 0.75])
    assert max(metrics.ema(r.itl)) == pytest.approx(0.32421875)
    assert metrics.meets_sla(r, rate=3)  # 0.324 < 0.333 although one gap was 0.5 s
    assert not metrics.meets_sla(r, rate=3.1)  # 0.324 >= 0.3226


def test_cumulative_sla_boundary():
    r = rec(512, [1.0, 1.25, 1.5])  # token i arrives i/4 s after the first
    assert metrics.meets_cumulative_sla(r, rate=4)
    assert not metrics.meets_cumulative_sla(r, rate=4.001)
    assert not metrics.meets_cumulative_sla(rec(256, [0.6, 0.7]), rate=2)  # ttft over 0.5 s
    # a late burst is forgiven by the cumulative test but not by the EMA
    late = rec(256, [0.1, 0.15, 0.2, 0.25, 0.75])  # gaps 0.05 x3 then 0.5
    assert metrics.meets_cumulative_sla(late, rate=6)  # 0.65 <= 4/6
    assert not metrics.meets_sla(late, rate=6)


def test_failed_requests_miss_the_sla_and_are_left_out_of_latencies():
    good = rec(512, [0.5, 0.75])
    bad = rec(512, [], error="HTTP 500")
    m = metrics.point_metrics([good, bad], duration=2.0)
    assert (m["completed"], m["failed"], m["errors"]) == (1, 1, ["HTTP 500"])
    assert m["request_throughput"] == 0.5
    assert m["sla_fraction"]["2"] == 0.5
    assert m["effective_throughput"]["2"] == 0.5  # FastGen: 1 request met the SLA in 2 s
    assert m["ttft"]["p50"] == 0.5


def test_point_metrics_throughput_and_effective_throughput():
    fast = rec(512, [0.5, 0.75, 1.0], start=0.0)  # gaps 0.25: meets R=2 and R=3, not R=4
    slow = rec(512, [1.5, 2.0], start=0.0)  # ttft 1.5 > 1.0: misses all
    m = metrics.point_metrics([fast, slow], duration=2.0, rates=(2.0, 3.0, 4.0))
    assert m["request_throughput"] == 1.0
    assert m["output_throughput"] == 2.5  # 5 tokens / 2 s
    assert m["effective_throughput"] == {"2": 0.5, "3": 0.5, "4": 0.0}
    assert m["effective_throughput_cumulative"] == {"2": 0.5, "3": 0.5, "4": 0.5}  # i/4 met with equality
    assert m["itl"]["mean"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    assert m["tpot"]["p50"] == pytest.approx((0.25 + 0.5) / 2)
    assert m["e2e"]["p50"] == 1.5


def test_effective_throughput_is_fastgens_met_sla_per_second_on_a_timeline_with_a_failure():
    # 4 requests over 4 s, worked by hand (prompt tokens / 512 = the ttft allowed):
    a = rec(512, [0.5, 0.75, 1.0])  # ttft 0.5 <= 1; gaps 0.25: below 1/2 and 1/3, not below 1/4
    b = rec(256, [1.25, 1.5, 1.75, 4.0], start=1.0)  # ttft 0.25 <= 0.5; the 2.25 s gap lifts the EMA to ~1.0
    c = rec(512, [], start=0.5, error="HTTP 500")  # failed: never meets the SLA
    d = rec(128, [2.1], start=2.0)  # ttft 0.1 <= 0.25; one token, nothing to average
    m = metrics.point_metrics([a, b, c, d], duration=4.0, rates=(2.0, 3.0, 4.0))
    assert max(metrics.ema(b.itl)) == pytest.approx((0.25 * (15 / 17) ** 2 + 0.25 * 15 / 17 + 2.25)
                                                    / ((15 / 17) ** 2 + 15 / 17 + 1))
    assert (m["completed"], m["failed"], m["request_throughput"]) == (3, 1, 0.75)
    assert m["sla_fraction"] == {"2": 0.5, "3": 0.5, "4": 0.25}  # met / all 4 sent
    # met / duration: 2 / 4, 2 / 4, 1 / 4 (completed / duration x met / all would count the failure
    # twice: 0.75 x 0.5 = 0.375)
    assert m["effective_throughput"] == {"2": 0.5, "3": 0.5, "4": 0.25}


def test_goodput_is_vllms_definition():
    slo = metrics.parse_goodput(["ttft:500", "tpot:250"])
    assert slo == {"ttft": 0.5, "tpot": 0.25}
    ok = rec(1, [0.5, 0.75])  # ttft 0.5, tpot 0.25: both limits met with equality
    late = rec(1, [0.75, 1.0])
    m = metrics.point_metrics([ok, late], duration=4.0, goodput_slo=slo)
    assert m["goodput"] == 0.25
    with pytest.raises(ValueError, match="ttft, tpot, e2e"):
        metrics.parse_goodput(["latency:5"])
    with pytest.raises(ValueError, match="milliseconds"):
        metrics.parse_goodput(["ttft:fast"])


def test_synthetic_workload_is_seeded_and_clamped():
    a = synthetic(200, prompt_len=100, gen_len=20, variance=0.3, max_len=120, vocab_size=50, seed=7,
                  exclude={0, 1, 2})
    b = synthetic(200, prompt_len=100, gen_len=20, variance=0.3, max_len=120, vocab_size=50, seed=7,
                  exclude={0, 1, 2})
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]
    assert all(len(r.prompt_ids) >= 1 and r.gen_len >= 1 for r in a)
    assert max(len(r.prompt_ids) + r.gen_len for r in a) == 120  # the clamp is reached
    assert not {0, 1, 2} & {i for r in a for i in r.prompt_ids}
    gens = np.array([r.gen_len for r in synthetic(4000, 100, 200, 0.3, 10_000, 50, 0)])
    assert gens.mean() == pytest.approx(200, rel=0.03) and gens.std() == pytest.approx(60, rel=0.05)
    fixed = synthetic(5, 30, 7, 0.0, 100, 50, 0)
    assert {(len(r.prompt_ids), r.gen_len) for r in fixed} == {(30, 7)}


def test_prompts_file_jsonl_and_plain(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": [5, 6, 7], "max_tokens": 3}\n{"prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9], "max_tokens": 4}\n')
    reqs = from_file(jsonl, gen_len=10, variance=0.0, max_len=10, seed=0, tokenizer=None)
    assert [(r.prompt_ids, r.gen_len) for r in reqs] == [([5, 6, 7], 3), ([4, 5, 6, 7, 8, 9], 4)]
    plain = tmp_path / "p.txt"
    plain.write_text("hello there\n\nabc\n")
    fake = lambda text: {"input_ids": [ord(c) for c in text]}
    reqs = from_file(plain, gen_len=2, variance=0.0, max_len=100, seed=0, tokenizer=fake)
    assert [(r.prompt_text, len(r.prompt_ids), r.gen_len) for r in reqs] == [("hello there", 11, 2), ("abc", 3, 2)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="line 1"):
        from_file(bad, 2, 0.0, 100, 0, None)
