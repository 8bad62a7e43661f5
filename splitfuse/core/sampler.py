"""Token sampling with plain torch ops: greedy, temperature, top-k, top-p, (seed, counter) noise.

A row's noise is a pure function of its request's seed and draw counter (core.philox, the same
Philox stream and Exp(1) transform as the Triton sampling kernel), so a seeded request samples the
same tokens alone or in a crowded batch, on this backend and on cuda. Noise is made on the CPU and
moved to the logits' device.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from splitfuse import native
from splitfuse.config import is_greedy
from splitfuse.core.philox import exponential, philox, seed_to_int64

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


# noise values made at once: small enough that the Philox rounds' int64 temporaries stay in cache
_NOISE_ELEMENTS = 1 << 15


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [S', V] float32 -> next token ids [S'] int64; every sampled row in one pass."""
    logits = apply_suppression(logits, batch)
    if batch.all_greedy:
        return logits.argmax(dim=-1)
    rows = [row for row in range(logits.shape[0]) if not batch.is_greedy_row(row)]
    all_sampled = len(rows) == logits.shape[0]
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    drawn = _draw(logits if all_sampled else logits.index_select(0, index), [batch.temperatures[r] for r in rows],
                  [batch.top_ks[r] for r in rows], [batch.top_ps[r] for r in rows],
                  [batch.seed_of(r) for r in rows], [batch.counters[r] for r in rows])
    return drawn if all_sampled else logits.argmax(dim=-1).index_copy(0, index, drawn)


log = logging.getLogger("splitfuse")

# torch's float vector width on this CPU: the lanes its softmax sums in (the kernel sums alike)
_SOFTMAX_LANES = {"AVX2": 8, "AVX512": 16}
# rows (length, logit scale) on which the kernel's softmax must equal torch's before it is trusted
_SOFTMAX_PROBES = ((17, 3.0), (300, 3.0), (4099, 40.0), (32000, 10.0))


def _native_sampler():
    """(kernel, lanes) where the native kernel is built and rounds its top-p softmax exactly as
    torch.softmax does on this CPU, else None (the torch path draws)."""
    kernel = native.load("sampling")
    lanes = _SOFTMAX_LANES.get(torch.backends.cpu.get_cpu_capability())
    if kernel is None or lanes is None or not _softmax_matches(kernel, lanes):
        return None
    return kernel, lanes


@functools.cache
def _softmax_matches(kernel, lanes: int) -> bool:
    """Whether the kernel's softmax of ascending rows is torch's bit for bit. Its top-p cut is decided
    from those floats, so a torch build or CPU that sums differently would move cuts by an ulp: such
    a machine keeps the torch path rather than draw tokens the reference would not."""
    for n, scale in _SOFTMAX_PROBES:
        row = torch.sort(torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale).values
        out = torch.empty(n)
        kernel.sorted_softmax(row.data_ptr(), out.data_ptr(), n, lanes)
        if not torch.equal(out, row.softmax(-1)):
            log.warning("native sampling is off: its softmax differs from torch's on this CPU (%s, %d lanes)",
                        torch.backends.cpu.get_cpu_capability(), lanes)
            return False
    return True


def _draw(logits: torch.Tensor, temperatures: list[float], top_ks: list[int], top_ps: list[float],
          seeds: list[int], counters: list[int]) -> torch.Tensor:
    """One token per row of logits [R, V]: the native kernel where it is built, else torch ops."""
    found = _native_sampler() if logits.dtype == torch.float32 and logits.device.type == "cpu" else None
    if found is None:
        return _torch_draw(logits, temperatures, top_ks, top_ps, seeds, counters)
    kernel, lanes = found
    drawn = _native_draw(kernel, lanes, logits, temperatures, top_ks, top_ps, seeds, counters)
    # rows the kernel leaves to torch: ties at the top-p cutoff, near-ties of the race, NaN / inf
    left = (drawn < 0).nonzero().squeeze(1).tolist()
    if left:
        drawn[left] = _torch_draw(logits[left], *([values[r] for r in left] for values in
                                                  (temperatures, top_ks, top_ps, seeds, counters)))
    return drawn


def _native_draw(kernel, lanes: int, logits: torch.Tensor, temperatures: list[float], top_ks: list[int],
                 top_ps: list[float], seeds: list[int], counters: list[int]) -> torch.Tensor:
    """The kernel's tokens [R] for fp32 CPU logits [R, V]; -1 where it leaves the row to _torch_draw."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_rows, vocab = logits.shape
    temps = torch.tensor(temperatures, dtype=torch.float32)
    ks, ps = torch.tensor(top_ks, dtype=torch.int64), torch.tensor(top_ps, dtype=torch.float64)
    seeds_t = torch.tensor([seed_to_int64(s) for s in seeds], dtype=torch.int64)
    counters_t, drawn = torch.tensor(counters, dtype=torch.int64), torch.empty(num_rows, dtype=torch.int64)
    kernel.sample(logits.data_ptr(), num_rows, vocab, logits.stride(0), temps.data_ptr(), ks.data_ptr(),
                  ps.data_ptr(), seeds_t.data_ptr(), counters_t.data_ptr(), drawn.data_ptr(), lanes)
    return drawn


def _torch_draw(logits: torch.Tensor, temperatures: list[float], top_ks: list[int], top_ps: list[float],
                seeds: list[int], counters: list[int]) -> torch.Tensor:
    """One token per row of logits [R, V] from its kept set (int64 [R]), by the exponential race,
    key for key as the Triton kernel.

    argmax over kept tokens of logit / T - log(E), E ~ Exp(1): picks token i with probability
    softmax(logit / T) over the kept set, with no cumsum; ties go to the lowest token id. Noise is
    made for kept tokens only (a pure function of seed, counter and token id), so top-k and top-p
    rows cost what they keep."""
    device, (num_rows, vocab) = logits.device, logits.shape
    temps = torch.tensor(temperatures, dtype=torch.float32, device=device)
    scaled = logits / temps[:, None]
    threshold, tied_rows, tied_filtered = _filter_plan(scaled, top_ks, top_ps)
    # >= the lowest float: a token also needs a logit above -inf (the only float below it), as
    # filter_logits(...) > -inf asks; a NaN is never kept
    kept = scaled >= threshold.clamp_min(-torch.finfo(torch.float32).max)
    if tied_rows is not None:
        kept.index_copy_(0, tied_rows, tied_filtered > float("-inf"))
    row, token = kept.nonzero(as_tuple=True)
    keys = logits[row, token] * (1.0 / temps)[row]  # the kernel's float32 1 / T
    row_cpu, token_cpu = row.cpu(), token.cpu()
    seed = torch.tensor([seed_to_int64(s) for s in seeds], dtype=torch.int64)[row_cpu]
    offset = torch.tensor(counters, dtype=torch.int64)[row_cpu] * vocab + token_cpu  # noise_offsets' layout
    log_noise = torch.empty(row.numel(), dtype=torch.float32)
    for lo in range(0, row.numel(), _NOISE_ELEMENTS):
        part = slice(lo, lo + _NOISE_ELEMENTS)
        log_noise[part] = torch.log(exponential(seed[part], offset[part]))
    keys = (keys - log_noise.to(device)).clamp_min(_LOWEST_KEY)
    best = torch.full((num_rows,), float("-inf"), device=device).scatter_reduce(0, row, keys, "amax")
    at_best = keys == best[row]
    drawn = torch.full((num_rows,), vocab, dtype=torch.int64, device=device).scatter_reduce(
        0, row[at_best], token[at_best], "amin")
    # a row that keeps nothing (every logit -inf or NaN) takes its argmax, as greedy would, never
    # the out-of-range id `vocab`
    empty = drawn == vocab
    return torch.where(empty, logits.argmax(dim=-1), drawn) if bool(empty.any()) else drawn


# where numpy's sort and partition can read the logits in place; elsewhere torch's do the same job
_NUMPY_DEVICES = ("cpu",)


def filter_logits(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: list[int],
                  top_ps: list[float]) -> torch.Tensor:
    """Logits [R, V] / each row's temperature, with -inf at the tokens its top-k and top-p drop
    (HF's rules); rows with different settings in one pass."""
    scaled = logits / temperatures[:, None]
    threshold, tied_rows, tied_filtered = _filter_plan(scaled, top_ks, top_ps)
    scaled.masked_fill_(scaled < threshold, float("-inf"))
    return scaled if tied_rows is None else scaled.index_copy_(0, tied_rows, tied_filtered)


def _filter_plan(scaled: torch.Tensor, top_ks: list[int], top_ps: list[float]):
    """How top-k and top-p filter scaled [R, V] (logits / T): (threshold [R, 1], tied rows, their
    filtered values). A row drops the tokens below its threshold (-inf: none), except the tied rows
    (int64 ids or None), whose filtered rows [n, V] are given whole.

    top-k's threshold is the k-th largest value (ties at it stay). top-p's is the value where the
    row's ascending cumulative mass passes 1 - top_p, found from a values-only sort (the mass
    depends only on the sorted values); only a row whose cutoff value repeats across it needs the
    order its sort put the ties in (or a row with NaN): those take torch.sort as before, so every
    row keeps exactly the tokens it kept."""
    num_rows, vocab = scaled.shape
    threshold = torch.full((num_rows, 1), float("-inf"), device=scaled.device)
    k_rows = [row for row, k in enumerate(top_ks) if 0 < k < vocab]
    if k_rows:
        kth = _kth_largest(scaled, k_rows, [top_ks[r] for r in k_rows])
        threshold[k_rows] = torch.where(kth.isnan(), float("-inf"), kth)  # part < NaN drops nothing
    p_rows = [row for row, p in enumerate(top_ps) if p < 1.0]
    if not p_rows:
        return threshold, None, None
    # Keep the smallest set of most likely tokens whose mass reaches top_p (HF's rule), among
    # the tokens top-k kept.
    index = torch.tensor(p_rows, dtype=torch.int64, device=scaled.device)
    limits = torch.tensor([1 - top_ps[r] for r in p_rows], dtype=torch.float32, device=scaled.device)
    part = scaled.index_select(0, index)
    if k_rows:
        part.masked_fill_(part < threshold.index_select(0, index), float("-inf"))
    sorted_part = _sorted_values(part)
    # _drop_sorted's count by bisection: the cumulative mass never decreases along a sorted row
    cumulative = sorted_part.softmax(-1).cumsum(-1)
    num_dropped = torch.searchsorted(cumulative, limits[:, None], right=True).clamp_max_(vocab - 1)
    cutoff = sorted_part.gather(1, num_dropped)
    threshold.index_copy_(0, index, torch.maximum(threshold.index_select(0, index), cutoff))
    # a cutoff value also just below the cutoff position: the sort's tie order decides
    before = sorted_part.gather(1, (num_dropped - 1).clamp_min(0))
    tied = ((num_dropped > 0) & (before == cutoff)).squeeze(1) | sorted_part[:, -1].isnan()
    if not bool(tied.any()):
        return threshold, None, None
    tied_in_part = tied.nonzero().squeeze(1)
    tied_part = part.index_select(0, tied_in_part)
    sorted_tied, order = torch.sort(tied_part, dim=-1, descending=False)
    drop = _drop_sorted(sorted_tied, limits.index_select(0, tied_in_part))
    return threshold, index.index_select(0, tied_in_part), tied_part.masked_fill_(drop.scatter(1, order, drop),
                                                                                  float("-inf"))


def _kth_largest(scaled: torch.Tensor, rows: list[int], ks: list[int]) -> torch.Tensor:
    """The k-th largest value [len(rows), 1] of each given row of scaled [R, V], k per row."""
    if scaled.device.type not in _NUMPY_DEVICES:
        part = scaled[rows]
        ks_t = torch.tensor(ks, dtype=torch.int64, device=scaled.device)
        return torch.topk(part, max(ks), dim=-1).values.gather(1, (ks_t - 1)[:, None])
    # numpy's partition finds a k-th value in linear time, several times faster than torch.topk
    vocab = scaled.shape[-1]
    positions = [vocab - k for k in ks]
    part = scaled.numpy()[rows]  # a copy, partitioned in place
    part.partition(sorted(set(positions)), axis=-1)
    return torch.from_numpy(part[np.arange(len(rows)), positions][:, None])


def _drop_sorted(sorted_logits: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """HF's top-p rule on ascending rows: drop while the cumulative mass is <= the limit; keep the last."""
    drop = sorted_logits.softmax(-1).cumsum(-1) <= limits[:, None]
    drop[:, -1] = False
    return drop


def _sorted_values(rows: torch.Tensor) -> torch.Tensor:
    """rows [R, V] sorted ascending along V, values only."""
    if rows.device.type in _NUMPY_DEVICES:
        return torch.from_numpy(np.sort(rows.contiguous().numpy(), axis=-1))
    return torch.sort(rows, dim=-1).values


def _filtered_probs(row_logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    return _filtered_logits(row_logits, temperature, top_k, top_p).softmax(-1)


def _filtered_logits(row_logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row's logits / temperature with -inf at the tokens top-k and top-p drop."""
    temps = torch.tensor([temperature], dtype=torch.float32, device=row_logits.device)
    return filter_logits(row_logits[None], temps, [top_k], [top_p])[0]


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_top: int):
    """Log-probabilities of the chosen tokens [S'] and the top num_top alternatives per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.view(-1, 1)).squeeze(1)
    if num_top > 0:
        top = torch.topk(logprobs, num_top, dim=-1)
        return chosen, top.values, top.indices
    return chosen, None, None
