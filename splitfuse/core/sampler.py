"""Token sampling with plain torch ops: greedy, temperature, top-k, top-p, per-request seeds.

Random draws come from each request's own generator, so a seeded request samples the same tokens
alone or in a crowded batch. Noise is drawn on the CPU (generators there need no device API) and
moved to the logits' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row sampling settings for the S' rows sampled in one step."""

    temperatures: list[float]
    top_ks: list[int]  # 0 = off
    top_ps: list[float]  # 1.0 = off
    generators: list[torch.Generator | None]  # None for greedy rows
    suppressed: list[list[int]]  # token ids that must not be picked now (EOS before min_new_tokens)
    num_logprobs: int = -1  # most top alternatives any row asked for; -1 = no row wants logprobs

    @property
    def all_greedy(self) -> bool:
        return all(t == 0 or k == 1 for t, k in zip(self.temperatures, self.top_ks))


def apply_suppression(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if not any(batch.suppressed):
        return logits
    logits = logits.clone()
    for row, ids in enumerate(batch.suppressed):
        if ids:
            logits[row, ids] = float("-inf")
    return logits


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [S', V] float32 -> next token ids [S'] int64."""
    logits = apply_suppression(logits, batch)
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    tokens = greedy.clone()
    for row, (temp, top_k, top_p, gen) in enumerate(
        zip(batch.temperatures, batch.top_ks, batch.top_ps, batch.generators)
    ):
        if temp == 0 or top_k == 1:
            continue
        probs = _filtered_probs(logits[row], temp, top_k, top_p)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p in one pass, no cumsum.
        noise = torch.empty(probs.shape[-1], dtype=torch.float32).exponential_(generator=gen)
        tokens[row] = (probs / noise.to(probs.device)).argmax()
    return tokens


def _filtered_probs(row_logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scaled = row_logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (HF's rule).
        sorted_logits, order = torch.sort(scaled, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[-1] = False
        drop = drop_sorted.scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.softmax(-1)


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_top: int):
    """Log-probabilities of the chosen tokens [S'] and the top num_top alternatives per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.view(-1, 1)).squeeze(1)
    if num_top > 0:
        top = torch.topk(logprobs, num_top, dim=-1)
        return chosen, top.values, top.indices
    return chosen, None, None
