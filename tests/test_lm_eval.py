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
import torch

import splitfuse
from splitfuse.data import DEMO_MODEL_DIR

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra")

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


def evaluate(model, model_args: dict | None, task_dir: Path) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["heldout_mc", "heldout_ppl", "heldout_gen"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), batch_size=8, log_samples=True,
        bootstrap_iters=0, random_seed=0)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, offline):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    write_tasks(root)
    return root


@pytest.fixture(scope="module")
def served(task_dir):
    """(local-completions LM, its results) against a served demo model."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model_dir = str(DEMO_MODEL_DIR)
    handle = splitfuse.serve(model_dir, backend="cpu", dtype="float32", served_model_name="demo")
    try:
        lm = LocalCompletionsAPI(model="demo", base_url=f"{handle.url}/v1/completions", tokenizer=model_dir,
                                 tokenizer_backend="huggingface", tokenized_requests=True, max_length=1024,
                                 num_concurrent=2, max_retries=1, add_bos_token=True, batch_size=8)
        return lm, evaluate(lm, None, task_dir)
    finally:
        handle.terminate()


@pytest.fixture(scope="module")
def hf(task_dir):
    """lm-eval's hf model type on the same directory."""
    pytest.importorskip("accelerate", reason="lm-eval's hf model type needs accelerate (lm-eval[hf], in the dev extra)")
    # both tokenize alike only when told the same (hf otherwise follows the tokenizer's default)
    return evaluate("hf", {"pretrained": str(DEMO_MODEL_DIR), "dtype": "float32", "device": "cpu",
                           "max_length": 1024, "add_bos_token": True}, task_dir)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        # local datasets only: never reach for the hub, and keep their cache out of the home directory
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


def per_sample(results: dict, task: str) -> list:
    return [s for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_served_multiple_choice_log_likelihoods_equal_transformers(served, hf_model):
    lm, results = served
    model = hf_model(str(DEMO_MODEL_DIR))
    samples = per_sample(results, "heldout_mc")
    assert len(samples) == 12
    for sample in samples:
        assert len(sample["resps"]) == 4
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)  # as lm-eval sent them
            ids = torch.tensor([context_ids + continuation_ids])
            with torch.no_grad():
                logprobs = model(ids).logits[0].float().log_softmax(-1)
            positions = range(len(context_ids), ids.shape[1])
            want = sum(logprobs[p - 1, ids[0, p]].item() for p in positions)
            assert resp[0][0] == pytest.approx(want, abs=TOL)
    assert results["results"]["heldout_mc"]["acc,none"] > 0.25  # the demo model knows Python better than chance


def test_served_perplexity_and_generation_tasks_run(served):
    _, results = served
    assert all(s["resps"][0][0] < 0 for s in per_sample(results, "heldout_ppl"))
    assert results["results"]["heldout_ppl"]["word_perplexity,none"] > 1
    generations = [s["resps"][0][0] for s in per_sample(results, "heldout_gen")]
    assert len(generations) == 3 and all(generations)  # every prompt got a non-empty continuation


def responses(results: dict, task: str) -> list:
    return [s["resps"] for s in per_sample(results, task)]


def test_multiple_choice_log_likelihoods_and_accuracy_equal_hf(served, hf):
    _, results = served
    for doc_ours, doc_theirs in zip(responses(results, "heldout_mc"), responses(hf, "heldout_mc"), strict=True):
        assert [r[0][0] for r in doc_ours] == pytest.approx([r[0][0] for r in doc_theirs], abs=TOL)
    assert results["results"]["heldout_mc"]["acc,none"] == hf["results"]["heldout_mc"]["acc,none"]


def test_perplexity_task_equals_hf(served, hf):
    _, results = served
    # one response per document: [[log-likelihood of the whole text]]
    ours, theirs = responses(results, "heldout_ppl"), responses(hf, "heldout_ppl")
    assert [r[0][0] for r in ours] == pytest.approx([r[0][0] for r in theirs], abs=TOL)
    assert results["results"]["heldout_ppl"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["heldout_ppl"]["word_perplexity,none"], rel=1e-5)


def test_generation_task_matches_hf(served, hf):
    _, results = served
    assert responses(results, "heldout_gen") == responses(hf, "heldout_gen")  # greedy in fp32 on both sides
    assert results["results"]["heldout_gen"]["exact_match,none"] == hf["results"]["heldout_gen"]["exact_match,none"]
