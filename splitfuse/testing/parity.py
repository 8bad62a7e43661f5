"""Compare the engine's greedy output with Hugging Face transformers, the correctness oracle.

Greedy outputs may differ only at a near-tie: where HF's own logits for the two competing tokens
at the first divergence differ by less than `tie_tolerance`. Anything else is a bug.
"""

from __future__ import annotations

import torch


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
