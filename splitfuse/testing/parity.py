"""Compare the engine's greedy output with Hugging Face transformers, the correctness oracle.

Greedy outputs may differ only at a near-tie: where HF's own logits for the two competing tokens
at the first divergence differ by less than `tie_tolerance`. Anything else is a bug.
Below them, the end-to-end checks every architecture's tests run on its tiny models.
"""

from __future__ import annotations

import random

import torch

import splitfuse


@torch.no_grad()
def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF `generate` greedy continuation of one unpadded prompt (generated ids only)."""
    inputs = torch.tensor([prompt_ids])
    out = hf_model.generate(
        inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=hf_model.config.pad_token_id,
    )
    return out[0, len(prompt_ids):].tolist()


@torch.no_grad()
def near_tie_gap(hf_model, prefix_ids: list[int], token_a: int, token_b: int) -> float:
    """|logit(a) - logit(b)| of HF's next-token logits after prefix_ids."""
    logits = hf_model(torch.tensor([prefix_ids])).logits[0, -1].float()
    return abs(logits[token_a].item() - logits[token_b].item())


def mismatch(hf_model, prompt_ids: list[int], ours: list[int], theirs: list[int],
             tie_tolerance: float = 1e-3) -> str | None:
    """None when ours matches theirs (or first differs at a near-tie), else a description."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            gap = near_tie_gap(hf_model, prompt_ids + theirs[:i], a, b)
            if gap < tie_tolerance:
                return None
            return (f"prompt of {len(prompt_ids)} tokens diverges at generated token {i}: "
                    f"ours {a}, HF {b}, HF logit gap {gap:.4g}\n  ours {ours}\n  HF   {theirs}")
    if len(ours) != len(theirs):
        return f"lengths differ for a prompt of {len(prompt_ids)} tokens:\n  ours {ours}\n  HF   {theirs}"
    return None


# ---- end-to-end checks the architecture tests share --------------------------------------------
PROMPT_LENGTHS = [1, 2, 7, 33, 64, 129, 200]
NEW_TOKENS = 8


def make_prompts(seed: int = 0) -> list[list[int]]:
    """Random prompts of PROMPT_LENGTHS tokens (ids 3-511 of the tiny tokenizer)."""
    rng = random.Random(seed)
    # Ids 0-2 are pad/bos/eos: random prompts avoid them so EOS only comes from the model.
    return [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENGTHS]


def check_all(name, settings, model_dir, hf_model, references, prompts=None, new_tokens=NEW_TOKENS):
    """The cpu engine built with `settings` continues `prompts` (default make_prompts()) greedily as
    HF does (`references(name)` or HF computed here) and frees every KV block; returns its pipeline.
    `model_dir(name)` gives the model's directory, `hf_model(path)` its HF model."""
    path = model_dir(name)
    pipe = splitfuse.pipeline(path, backend="cpu", **settings)
    prompts = prompts or make_prompts()
    expected = references(name) if references else [hf_greedy(hf_model(path), p, new_tokens) for p in prompts]
    responses = pipe(prompts, max_new_tokens=new_tokens, temperature=0.0)
    problems = [mismatch(hf_model(path), p, r.token_ids, ref) for p, r, ref in zip(prompts, responses, expected)]
    problems = [p for p in problems if p]
    if problems:
        raise AssertionError(f"{name}: greedy output differs from HF's\n" + "\n".join(problems))
    if pipe.engine.blocks.num_free != pipe.engine.blocks.num_blocks:
        raise AssertionError(f"{name}: {pipe.engine.blocks.num_blocks - pipe.engine.blocks.num_free} KV blocks "
                             "still held after every request finished")
    return pipe


def check_preemption(name, model_dir, hf_model) -> None:
    """40 blocks of 4 tokens admit three of four 33-54 token prompts, which then outgrow the cache
    while decoding 40 tokens each: the newest is preempted and recomputed, and the output still
    equals HF's."""
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (33, 40, 47, 54)]
    settings = dict(token_budget=32, kv_block_size=4, num_kv_blocks=40)
    pipe = check_all(name, settings, model_dir, hf_model, None, prompts, new_tokens=40)
    if pipe.engine.scheduler.num_preemptions == 0:
        raise AssertionError(f"{name}: nothing was preempted, so recompute was not exercised")
