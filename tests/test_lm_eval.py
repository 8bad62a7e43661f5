"""lm-eval against `splitfuse serve` (local-completions) and against HF transformers (hf) on the demo
model: the same per-sample log-likelihoods, the same accuracy, perplexity and generation tasks.

The tasks are made here from source files the demo model was not trained on (training.json's
held-out files), as local JSONL datasets: nothing comes from the hub."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest

import splitfuse
from splitfuse.data import DEMO_MODEL_DIR

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra")
pytest.importorskip("accelerate", reason="lm-eval's hf model type needs accelerate (lm-eval[hf], in the dev extra)")

TOL = 1e-4
HELD_OUT = Path(textwrap.__file__)  # textwrap.py: held out of the demo model's training


def code_lines() -> list[str]:
    lines = [ln.strip() for ln in HELD_OUT.read_text().splitlines()]
    return [ln for ln in lines if 30 <= len(ln) <= 80 and not ln.startswith("#")]


def write_tasks(root: Path) -> None:
    """Three tasks over held-out text: multiple choice, perplexity and generation."""
    lines = code_lines()
    rng = random.Random(0)
    picked = rng.sample(lines, 12)
    mc = []
    for line in picked:
        cut = line.rfind(" ", 0, len(line) // 2) + 1 or len(line) // 2
        wrong = [w[len(w) // 2:] for w in rng.sample([x for x in lines if x != line], 3)]
        answer = rng.randrange(4)
        choices = wrong[:answer] + [line[cut:]] + wrong[answer:]
        mc.append({"context": line[:cut], "choices": choices, "answer": answer})
    docs = {"mc": mc,
            "ppl": [{"text": "\n".join(lines[i:i + 6])} for i in range(0, 24, 6)],
            "gen": [{"prefix": line[:line.rfind(" ", 0, len(line) // 2) + 1], "line": line} for line in picked[:3]]}
    for name, rows in docs.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{path}}\ntest_split: test\n"
    (root / "mc.yaml").write_text("task: heldout_mc\n" + common.format(path=root / "mc.jsonl") + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "{{context}}"
        target_delimiter: ""
        doc_to_choice: "{{choices}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
        """))
    (root / "ppl.yaml").write_text("task: heldout_ppl\n" + common.format(path=root / "ppl.jsonl") + textwrap.dedent("""\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
        """))
    (root / "gen.yaml").write_text("task: heldout_gen\n" + common.format(path=root / "gen.jsonl") + textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "{{prefix}}"
        doc_to_target: "{{line[prefix|length:]}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 12
          do_sample: false
        metric_list:
          - metric: exact_match
        """))


def evaluate(model: str, model_args: dict, task_dir: Path) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["heldout_mc", "heldout_ppl", "heldout_gen"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), batch_size=8, log_samples=True,
        bootstrap_iters=0, random_seed=0)


@pytest.fixture(scope="module")
def results(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    write_tasks(root)
    model_dir = str(DEMO_MODEL_DIR)
    handle = splitfuse.serve(model_dir, backend="cpu", dtype="float32", served_model_name="demo")
    try:
        served = evaluate("local-completions", {
            "model": "demo", "base_url": f"{handle.url}/v1/completions", "tokenizer": model_dir,
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 1024,
            "num_concurrent": 2, "max_retries": 1, "add_bos_token": True}, root)
    finally:
        handle.terminate()
    # both tokenize alike only when told the same (hf otherwise follows the tokenizer's default)
    hf = evaluate("hf", {"pretrained": model_dir, "dtype": "float32", "device": "cpu", "max_length": 1024,
                         "add_bos_token": True}, root)
    return served, hf


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        # local datasets only: never reach for the hub, and keep their cache out of the home directory
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield mp


def per_sample(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_log_likelihoods_and_accuracy_equal_hf(results):
    served, hf = results
    ours, theirs = per_sample(served, "heldout_mc"), per_sample(hf, "heldout_mc")
    assert len(ours) == len(theirs) == 12
    for doc_ours, doc_theirs in zip(ours, theirs):
        assert len(doc_ours) == 4
        for (ll_ours, greedy_ours), (ll_theirs, greedy_theirs) in zip(
                [r[0] for r in doc_ours], [r[0] for r in doc_theirs]):
            assert float(ll_ours) == pytest.approx(float(ll_theirs), abs=TOL)
            assert ll_ours < 0
    acc = served["results"]["heldout_mc"]["acc,none"]
    assert acc == hf["results"]["heldout_mc"]["acc,none"]
    assert acc > 0.25  # the demo model knows Python better than chance


def test_perplexity_task_equals_hf(results):
    served, hf = results
    ours, theirs = per_sample(served, "heldout_ppl"), per_sample(hf, "heldout_ppl")
    # one response per document: [[log-likelihood of the whole text]]
    assert [r[0][0] for r in ours] == pytest.approx([r[0][0] for r in theirs], abs=TOL)
    assert all(r[0][0] < 0 for r in ours)
    assert served["results"]["heldout_ppl"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["heldout_ppl"]["word_perplexity,none"], rel=1e-5)


def test_generation_task_runs_and_matches_hf(results):
    served, hf = results
    ours, theirs = per_sample(served, "heldout_gen"), per_sample(hf, "heldout_gen")
    assert len(ours) == 3 and all(r[0][0] for r in ours)  # every prompt got a non-empty continuation
    assert ours == theirs  # greedy in fp32 on both sides
    assert served["results"]["heldout_gen"]["exact_match,none"] == hf["results"]["heldout_gen"]["exact_match,none"]
