"""Token sampling with plain torch ops: greedy, temperature, top-k, top-p, (seed, counter) noise.

A row's noise is a pure function of its request's seed and draw counter (core.philox, the same
Philox stream and Exp(1) transform as the Triton sampling kernel), so a seeded request samples the
same tokens alone or in a crowded batch, on this backend and on cuda. Noise is made on the CPU and
moved to the logits' device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from splitfuse.config import is_greedy
from splitfuse.core.philox import exponential, noise_offsets, philox

# the kernel clamps a kept token's key here, so a kept token always beats a dropped one (-inf)
_LOWEST_KEY = -3.4e38


@dataclass(init=False)
class SamplingBatch:
    """Per-row sampling settings for the S' rows sampled in one step."""

    temperatures: list[float]
    top_ks: list[int]  # 0 = off
    top_ps: list[float]  # 1.0 = off
    seeds: list[int | None]  # None for greedy rows; any int, read modulo 2^64
    counters: list[int]  # draws the row's request made before this one
    suppressed: list[list[int]]  # token ids that must not be picked now (EOS before min_new_tokens)
    num_logprobs: int = -1  # most top alternatives any row asked for; -1 = no row wants logprobs

    def __init__(self, temperatures, top_ks, top_ps, seeds=None, counters=None, suppressed=None,
                 num_logprobs: int = -1, *, generators=None) -> None:
        if generators is not None:  # the v1 contract; every draw then uses counter 0
            warnings.warn("SamplingBatch(generators=...) is deprecated: give seeds and counters (a "
                          "generator's initial_seed() is taken as its row's seed, at counter 0)",
                          DeprecationWarning, stacklevel=2)
            seeds = [None if g is None else g.initial_seed() for g in generators]
            counters = [0] * len(seeds)
        if seeds is None or counters is None or suppressed is None:
            raise TypeError("SamplingBatch: seeds, counters and suppressed are required")
        self.temperatures, self.top_ks, self.top_ps = list(temperatures), list(top_ks), list(top_ps)
        self.seeds, self.counters, self.suppressed = list(seeds), list(counters), list(suppressed)
        self.num_logprobs = num_logprobs
        lengths = [len(v) for v in (self.temperatures, self.top_ks, self.top_ps, self.seeds, self.counters,
                                    self.suppressed)]
        if len(set(lengths)) != 1:
            raise ValueError("SamplingBatch: temperatures, top_ks, top_ps, seeds, counters and suppressed "
                             f"need one entry per row each, got lengths {lengths}")

    def is_greedy_row(self, row: int) -> bool:
        return is_greedy(self.temperatures[row], self.top_ks[row])

    def seed_of(self, row: int) -> int:
        """The seed of a sampled row; a sampled row without one is the caller's error."""
        seed = self.seeds[row]
        if seed is None:
            raise ValueError(f"SamplingBatch: row {row} samples (temperature {self.temperatures[row]}, "
                             f"top_k {self.top_ks[row]}) but its seed is None")
        return seed

    @property
    def all_greedy(self) -> bool:
        return all(is_greedy(t, k) for t, k in zip(self.temperatures, self.top_ks))

    @property
    def generators(self) -> list[torch.Generator | None]:
        """Compatibility for v1 backends that draw from torch generators: per row a fresh generator
        seeded from (seed, counter), None for greedy rows. New backends read seeds and counters."""
        gens: list[torch.Generator | None] = []
        for row, (seed, counter) in enumerate(zip(self.seeds, self.counters)):
            if seed is None or self.is_greedy_row(row):
                gens.append(None)
                continue
            # Philox words 2 and 3, which the noise (word 0 only) never uses: a 64-bit seed per draw
            _, _, w2, w3 = philox(seed, torch.tensor([counter], dtype=torch.int64))
            gens.append(torch.Generator().manual_seed(int(w2) | int(w3) << 32))
        return gens


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
    for row in range(logits.shape[0]):
        if batch.is_greedy_row(row):
            continue
        tokens[row] = _draw(logits[row], batch.temperatures[row], batch.top_ks[row], batch.top_ps[row],
                            batch.seed_of(row), batch.counters[row])
    return tokens


def _draw(row_logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int,
          counter: int) -> torch.Tensor:
    """One token of the kept set (a 0-d tensor on the logits' device, no host sync) by the
    exponential race, key for key as the Triton kernel.

    argmax over kept tokens of logit / T - log(E), E ~ Exp(1): picks token i with probability
    softmax(logit / T) over the kept set, with no cumsum; ties go to the lowest token id."""
    kept = _filtered_logits(row_logits, temperature, top_k, top_p) > float("-inf")
    inv_t = float(1.0 / torch.tensor(temperature, dtype=torch.float32))  # the kernel's float32 1 / T
    noise = exponential(seed, noise_offsets(counter, row_logits.shape[-1])).to(row_logits.device)
    keys = (row_logits * inv_t - torch.log(noise)).clamp_min(_LOWEST_KEY)
    return torch.where(kept, keys, float("-inf")).argmax()


def _filtered_probs(row_logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    return _filtered_logits(row_logits, temperature, top_k, top_p).softmax(-1)


def _filtered_logits(row_logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits / temperature with -inf at the tokens top-k and top-p drop."""
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
    return scaled


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_top: int):
    """Log-probabilities of the chosen tokens [S'] and the top num_top alternatives per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.view(-1, 1)).squeeze(1)
    if num_top > 0:
        top = torch.topk(logprobs, num_top, dim=-1)
        return chosen, top.values, top.indices
    return chosen, None, None
