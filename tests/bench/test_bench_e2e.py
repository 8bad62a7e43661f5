"""`splitfuse bench` end to end on a tiny model: results.json and plots, our server and the HF baselines."""

from __future__ import annotations

import json

import pytest

from splitfuse.cli import main

pytestmark = pytest.mark.slow

LATENCY_KEYS = {"mean", "p50", "p90", "p95", "p99"}


def check_point(point: dict, gen_tokens: list[int]) -> None:
    assert point["completed"] == len(gen_tokens), point["errors"]
    # every requested token was counted, so max_tokens + ignore_eos held and the stream was parsed right
    assert point["output_tokens"] == sum(gen_tokens)
    for key in ("ttft", "tpot", "itl", "e2e"):
        assert set(point[key]) == LATENCY_KEYS
        # itl may be 0: tokens that reach the client in one read share an arrival time
        assert 0 <= point[key]["p50"] <= point[key]["p90"] <= point[key]["p95"] <= point[key]["p99"]
    assert 0 < point["ttft"]["p50"] <= point["e2e"]["p50"]
    assert set(point["effective_throughput"]) == {"2", "4", "6"}
    for value in point["effective_throughput"].values():
        assert 0 <= value <= point["request_throughput"]
    assert point["request_throughput"] > 0 and point["output_throughput"] > 0


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", tiny_model_dir("llama"), "--out", str(out), "--backend", "cpu", "--baseline", "hf", "--clients", "1,3",
                 "--requests", "4", "--warmup", "1", "--prompt-len", "24", "--gen-len", "4",
                 "--goodput", "ttft:60000", "--no-progress"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_local_run_measures_splitfuse_and_both_hf_baselines(local_run):
    _, results = local_run
    gens = results["workload"]["gen_tokens"]
    assert len(gens) == 4 and results["workload"]["prompts_sent_as"] == "token ids"
    assert set(results["systems"]) == {"splitfuse", "hf", "hf_cb"}
    for name, system in results["systems"].items():
        assert [p["clients"] for p in system["points"]] == [1, 3], name
        for point in system["points"]:
            check_point(point, gens)
            assert point["goodput"] == pytest.approx(point["request_throughput"])  # a 60 s limit is always met


def test_local_run_writes_plots(local_run):
    out, results = local_run
    names = {"latency_throughput_closed.png", "effective_throughput_closed.png", "token_latency_closed.png"}
    assert set(results["plots"]) == names
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_endpoint_run_against_our_server(tiny_model_dir, tmp_path):
    import splitfuse

    model = tiny_model_dir("llama")
    handle = splitfuse.serve(model, backend="cpu", port=0)
    try:
        url = handle.url + "/v1"
        out = tmp_path / "endpoint"
        # MODEL here only supplies the tokenizer for text prompts (the default for other servers)
        code = main(["bench", model, "--endpoint", url, "--out", str(out), "--clients", "2", "--rate", "40", "--requests", "4",
                     "--warmup", "0", "--prompt-len", "16", "--gen-len", "5", "--no-progress", "--no-plots"])
    finally:
        handle.terminate()
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["workload"]["prompts_sent_as"] == "text"
    system = results["systems"][url]
    assert [(p["mode"], p.get("clients"), p.get("rate")) for p in system["points"]] == [
        ("closed", 2, None), ("open", None, 40.0)]
    for point in system["points"]:
        check_point(point, results["workload"]["gen_tokens"])


def test_bad_flags_are_clear_errors(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--baseline", "vllm"]) == 1
    assert "--baseline: unknown vllm" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path), "--goodput", "latency:5"]) == 1
    assert "--goodput" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_missing_continuous_batching_is_a_note_not_a_failure(monkeypatch, tmp_path):
    from splitfuse.bench import hf_baseline, runner
    from splitfuse.bench.workloads import BenchRequest

    monkeypatch.setattr(hf_baseline, "continuous_batching_missing", lambda: "transformers 4.0 has none")
    notes = {}
    options = runner.BenchOptions(out=str(tmp_path), baselines=["hf"], clients=[1])
    systems = runner._systems(options, "unused", [BenchRequest([1, 2], 3)], True, notes)
    assert [s.name for s in systems] == ["splitfuse", "hf"]
    assert notes == {"hf_cb": {"skipped": "transformers 4.0 has none"}}


def test_plots_cover_both_load_modes_and_skip_failed_systems(tmp_path):
    from splitfuse.bench.metrics import RequestRecord, point_metrics
    from splitfuse.bench.plots import write_plots

    def point(mode: str, x: float, scale: float) -> dict:
        records = [RequestRecord(64, 0.0, [0.1 * scale, 0.2 * scale, 0.3 * scale]) for _ in range(4)]
        key = "clients" if mode == "closed" else "rate"
        return {"mode": mode, key: x, **point_metrics(records, duration=1.0 * scale)}

    systems = {name: {"points": [point(m, x, s) for m in ("closed", "open") for x in (1, 2)]}
               for name, s in (("splitfuse", 1.0), ("hf", 2.0))}
    systems["broken"] = {"error": "RuntimeError: no server"}
    written = write_plots({"systems": systems}, tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{stem}_{mode}.png" for mode in ("closed", "open") for stem in (
        "latency_throughput", "effective_throughput", "token_latency"))
    assert all(p.stat().st_size > 10_000 for p in written)
