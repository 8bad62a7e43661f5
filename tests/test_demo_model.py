"""The shipped demo model: the default when no model is named, and a parity check on trained weights.

Random weights spread logits far apart; trained weights give the close calls real text has, so
this is where a small numerical drift would show up as a different token or log-probability.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import sysconfig

import pytest
import torch

import splitfuse
from splitfuse.data import DEMO_MODEL_DIR, default_model_dir
from splitfuse.testing.parity import hf_greedy, mismatch

HELD_OUT_FILES = ("fractions.py", "textwrap.py", "heapq.py", "shlex.py")  # never trained on
PROMPT_TOKENS, NEW_TOKENS = 96, 16


def test_the_default_model_is_the_shipped_demo_model():
    assert default_model_dir() == DEMO_MODEL_DIR
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 10_000_000


@pytest.fixture(scope="module")
def engine_fp32():
    return splitfuse.pipeline(None, backend="cpu", dtype="float32", kv_cache_gib=0.05, token_budget=64)


@pytest.fixture(scope="module")
def hf_demo():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()


def held_out_prompts(tokenizer) -> list[list[int]]:
    """Slices of held-out stdlib files, starting mid-file (no BOS), as token ids."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for name in HELD_OUT_FILES:
        ids = tokenizer(stdlib.joinpath(name).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        start = len(ids) // 3
        prompts.append(ids[start:start + PROMPT_TOKENS])
    return prompts


@torch.no_grad()
def hf_token_logprobs(model, prompt: list[int], generated: list[int]) -> list[float]:
    ids = torch.tensor([prompt + generated])
    logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return [logprobs[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(generated)]


def test_greedy_tokens_and_logprobs_match_hf_on_held_out_text(engine_fp32, hf_demo):
    prompts = held_out_prompts(engine_fp32.tokenizer)
    responses = engine_fp32(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    compared = 0
    for prompt, response in zip(prompts, responses):
        expected = hf_greedy(hf_demo, prompt, NEW_TOKENS)
        assert mismatch(hf_demo, prompt, response.token_ids, expected) is None
        if response.token_ids != expected:
            continue  # diverged at a near-tie: log-probabilities after it describe other text
        theirs = hf_token_logprobs(hf_demo, prompt, response.token_ids)
        ours = [lp.logprob for lp in response.logprobs]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4
        compared += 1
    assert compared >= len(prompts) - 1  # near-ties are rare: the log-probabilities were checked


def looks_like_python(text: str) -> bool:
    """The completion compiles as Python once its last, possibly cut-off line is dropped and an
    open docstring or block is closed, and it has an indented body of its own."""
    lines = text.splitlines(keepends=True)
    if not text.endswith("\n"):
        lines = lines[:-1]  # cut off mid-line by max_new_tokens
    complete = "".join(lines)
    if "\n    " not in complete:
        return False
    for closer in ("", '"""\n', "'''\n"):  # a docstring the cut left open
        for indent in range(0, 17, 4):
            try:
                compile(complete + closer + " " * indent + "pass\n", "<completion>", "exec")
                return True
            except SyntaxError:
                continue
    return False


def test_generate_with_no_model_completes_python():
    result = subprocess.run(
        [sys.executable, "-m", "splitfuse", "generate", "def fibonacci(n):", "--max-new-tokens", "48",
         "--temperature", "0", "--backend", "cpu", "--kv-cache-gib", "0.05"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fibonacci(n):")  # the prompt, then its completion
    assert looks_like_python(result.stdout), result.stdout
