"""The batched sampler draws, row for row, the token the one-row-at-a-time sampler drew: seeded
requests keep their tokens. The reference below is that row-wise sampler, kept as written."""

from __future__ import annotations

import random

import pytest
import torch

from splitfuse.core.philox import exponential, noise_offsets
from splitfuse.core.sampler import SamplingBatch, filter_logits, sample_tokens


def rowwise_filtered(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scaled = row / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[-1] = False
        drop = drop_sorted.scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def rowwise_draw(row, temperature, top_k, top_p, seed, counter) -> int:
    kept = rowwise_filtered(row, temperature, top_k, top_p) > float("-inf")
    inv_t = float(1.0 / torch.tensor(temperature, dtype=torch.float32))
    noise = exponential(seed, noise_offsets(counter, row.shape[-1]))
    keys = (row * inv_t - torch.log(noise)).clamp_min(-3.4e38)
    return int(torch.where(kept, keys, float("-inf")).argmax())


def mixed_batch(rows: int, vocab: int, seed: int):
    rng = random.Random(seed)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    logits[::5, : vocab // 2] = logits[::5, :1]  # rows with many ties, at the top-k and top-p cutoffs
    settings = dict(
        temperatures=[rng.choice([0.0, 0.3, 0.7, 1.0, 1.5]) for _ in range(rows)],
        top_ks=[rng.choice([0, 0, 1, 3, 40, vocab, vocab + 5]) for _ in range(rows)],
        top_ps=[rng.choice([1.0, 1.0, 0.9, 0.5, 0.05]) for _ in range(rows)],
        counters=[rng.randrange(0, 10**6) for _ in range(rows)],
        suppressed=[[rng.randrange(vocab)] if rng.random() < 0.2 else [] for _ in range(rows)],
    )
    settings["seeds"] = [rng.choice([0, 7, -5, 2**63 - 1, 2**64 - 3, rng.getrandbits(64)]) for _ in range(rows)]
    return logits, SamplingBatch(**settings)


@pytest.mark.parametrize("rows, vocab, seed", [(37, 301, 0), (64, 1000, 1), (9, 41, 2)])
def test_every_row_draws_what_the_rowwise_sampler_drew(rows, vocab, seed):
    logits, batch = mixed_batch(rows, vocab, seed)
    got = sample_tokens(logits, batch).tolist()
    for row in range(rows):
        masked = logits[row].clone()
        masked[batch.suppressed[row]] = float("-inf")
        if batch.is_greedy_row(row):
            want = int(masked.argmax())
        else:
            want = rowwise_draw(masked, batch.temperatures[row], batch.top_ks[row], batch.top_ps[row],
                                batch.seeds[row], batch.counters[row])
        assert got[row] == want, f"row {row}"


def test_filtered_logits_equal_the_rowwise_filter_bit_for_bit():
    logits, batch = mixed_batch(50, 257, 3)
    temps = [t or 1.0 for t in batch.temperatures]
    got = filter_logits(logits, torch.tensor(temps), batch.top_ks, batch.top_ps)
    for row in range(50):
        want = rowwise_filtered(logits[row], temps[row], batch.top_ks[row], batch.top_ps[row])
        assert torch.equal(got[row], want), f"row {row}"


def test_noise_made_in_blocks_changes_no_draw(monkeypatch):
    import splitfuse.core.sampler as sampler

    logits, batch = mixed_batch(23, 500, 4)
    whole = sample_tokens(logits, batch)
    monkeypatch.setattr(sampler, "_NOISE_ELEMENTS", 777)  # blocks that split rows
    assert torch.equal(sample_tokens(logits, batch), whole)


def test_top_p_cutoff_inside_a_run_of_ties_keeps_what_the_rowwise_filter_kept():
    # ten equal logits under one large one: top-p 0.96 drops six of the ten tied tokens, so which
    # six is the sort's tie order; a row without ties at its cutoff rides along in the same batch
    tied = torch.tensor([0.0] * 10 + [5.0])
    plain = torch.tensor([float(i) / 3 for i in range(11)])
    logits = torch.stack([tied, plain, tied.flip(0)])
    got = filter_logits(logits, torch.ones(3), [0, 0, 0], [0.96, 0.96, 0.9])
    for row, top_p in enumerate([0.96, 0.96, 0.9]):
        want = rowwise_filtered(logits[row], 1.0, 0, top_p)
        assert torch.equal(got[row], want), f"row {row}"
    assert 0 < int((got[0] == float("-inf")).sum()) < 10  # the cutoff does split the ties


def test_top_p_keeps_what_the_rowwise_filter_kept_on_many_random_rows():
    logits = torch.randn(200, 3000, generator=torch.Generator().manual_seed(5)) * 4
    logits[::7] = logits[::7].round()  # many ties, some at the cutoff
    top_ps = [[0.05, 0.5, 0.9, 0.95, 0.99][r % 5] for r in range(200)]
    got = filter_logits(logits, torch.full((200,), 0.8), [0] * 200, top_ps)
    for row in range(200):
        assert torch.equal(got[row], rowwise_filtered(logits[row], 0.8, 0, top_ps[row])), f"row {row}"


def test_rows_with_infinite_and_nan_logits_filter_and_draw_as_the_rowwise_sampler():
    logits = torch.randn(6, 60, generator=torch.Generator().manual_seed(6)) * 2
    logits[0, :5] = float("inf")
    logits[1, 10:] = float("-inf")
    logits[2, 7] = float("nan")
    logits[3, :] = float("-inf")
    logits[4, 3:9] = logits[4, 2]  # ties
    batch = SamplingBatch([0.7] * 6, [5, 0, 20, 3, 4, 0], [0.9, 0.8, 1.0, 0.5, 0.9, 0.3], seeds=list(range(6)),
                          counters=[2] * 6, suppressed=[[] for _ in range(6)])
    got = filter_logits(logits, torch.full((6,), 0.7), batch.top_ks, batch.top_ps)
    drawn = sample_tokens(logits, batch).tolist()
    for row in range(6):
        want = rowwise_filtered(logits[row], 0.7, batch.top_ks[row], batch.top_ps[row])
        torch.testing.assert_close(got[row], want, rtol=0, atol=0, equal_nan=True, msg=f"row {row}")
        assert drawn[row] == rowwise_draw(logits[row], 0.7, batch.top_ks[row], batch.top_ps[row], row, 2), \
            f"row {row}"
    assert drawn[3] == 0  # nothing to draw from: the argmax, a real token id, never the vocabulary size


def test_torch_sort_and_topk_path_for_other_devices_draws_the_same_tokens(monkeypatch):
    import splitfuse.core.sampler as sampler

    logits, batch = mixed_batch(40, 300, 7)
    numpy_path = sample_tokens(logits, batch)
    temps = torch.tensor([t or 1.0 for t in batch.temperatures])
    numpy_filtered = filter_logits(logits, temps, batch.top_ks, batch.top_ps)
    monkeypatch.setattr(sampler, "_NUMPY_DEVICES", ())  # as on a device numpy cannot read
    assert torch.equal(sample_tokens(logits, batch), numpy_path)
    assert torch.equal(filter_logits(logits, temps, batch.top_ks, batch.top_ps), numpy_filtered)
