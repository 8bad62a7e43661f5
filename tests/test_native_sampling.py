"""The native sampling kernel draws, row for row, the token the torch path and the row-wise sampler
draw; rows it cannot decide exactly (ties at the top-p cutoff, NaN, inf) go through the torch path."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_sampler_batched import rowwise_draw

import splitfuse.core.sampler as sampler
from splitfuse import native
from splitfuse.core.sampler import SamplingBatch, sample_tokens


@pytest.fixture(scope="module")
def kernel():
    module = native.load("sampling")
    assert module is not None, native.unavailable_reason("sampling")
    return module


@pytest.fixture(scope="module")
def lanes(kernel):
    capability = torch.backends.cpu.get_cpu_capability()
    assert capability in sampler._SOFTMAX_LANES, f"torch's CPU capability {capability} has no lane count"
    return sampler._SOFTMAX_LANES[capability]


def torch_path(logits: torch.Tensor, batch: SamplingBatch, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv("SPLITFUSE_NATIVE", "0")
        return sample_tokens(logits, batch)


def settings_batch(rows: int, vocab: int, seed: int):
    """Random logits (some rows with runs of ties) and a mix of every setting, greedy rows included."""
    rng = random.Random(seed)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * rng.choice([1.0, 3.0, 8.0])
    logits[::6, : vocab // 3] = logits[::6, :1]  # ties at the top-k / top-p cutoffs
    batch = SamplingBatch(
        temperatures=[rng.choice([0.0, 1e-3, 0.3, 0.8, 1.0, 1.7]) for _ in range(rows)],
        top_ks=[rng.choice([0, 0, 1, 2, 5, 50, vocab - 1, vocab, vocab + 7]) for _ in range(rows)],
        top_ps=[rng.choice([1.0, 1.0, 0.99, 0.9, 0.5, 0.05]) for _ in range(rows)],
        seeds=[rng.choice([0, 7, -5, 2**63 - 1, 2**64 - 3, rng.getrandbits(64)]) for _ in range(rows)],
        counters=[rng.randrange(0, 10**6) for _ in range(rows)],
        suppressed=[[rng.randrange(vocab)] if rng.random() < 0.2 else [] for _ in range(rows)],
    )
    return logits, batch


def rowwise(logits: torch.Tensor, batch: SamplingBatch) -> list[int]:
    tokens = []
    for row in range(logits.shape[0]):
        masked = logits[row].clone()
        masked[batch.suppressed[row]] = float("-inf")
        if batch.is_greedy_row(row):
            tokens.append(int(masked.argmax()))
        else:
            tokens.append(rowwise_draw(masked, batch.temperatures[row], batch.top_ks[row], batch.top_ps[row],
                                       batch.seeds[row], batch.counters[row]))
    return tokens


@pytest.mark.parametrize("rows, vocab, seed", [(40, 301, 0), (33, 1000, 1), (17, 41, 2), (12, 4096, 3),
                                               (25, 9, 4), (30, 517, 5)])
def test_native_draws_what_the_torch_path_and_the_rowwise_sampler_draw(kernel, rows, vocab, seed, monkeypatch):
    logits, batch = settings_batch(rows, vocab, seed)
    got = sample_tokens(logits, batch)
    assert torch.equal(got, torch_path(logits, batch, monkeypatch))
    assert got.tolist() == rowwise(logits, batch)


def kernel_tokens(kernel, lanes, logits, temperatures, top_ks, top_ps, seeds=None, counters=None):
    rows = logits.shape[0]
    return sampler._native_draw(kernel, lanes, logits, temperatures, top_ks, top_ps,
                                seeds or list(range(rows)), counters or [3] * rows)


def test_the_kernel_decides_rows_without_ties_itself(kernel, lanes):
    # so the comparisons above test the kernel, not the torch path it leaves hard rows to
    logits = torch.randn(24, 2000, generator=torch.Generator().manual_seed(9)) * 3
    settings = [(0.8, 0, 0.95), (0.8, 50, 1.0), (0.8, 50, 0.95), (1.0, 0, 1.0), (0.5, 7, 0.5), (1.3, 0, 0.3)] * 4
    temps, ks, ps = (list(column) for column in zip(*settings))
    drawn = kernel_tokens(kernel, lanes, logits, temps, ks, ps)
    assert bool((drawn >= 0).all())
    want = sampler._torch_draw(logits, temps, ks, ps, list(range(24)), [3] * 24)
    assert torch.equal(drawn, want)


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_top_p_on_long_rows_cuts_where_the_torch_path_cuts(kernel, lanes, scale):
    # long rows take the kernel's bounded cut (no full sort): the same tokens as the sorted cut
    logits = torch.randn(48, 3000, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    top_ps = [[0.3, 0.5, 0.9, 0.95, 0.99, 0.999][r % 6] for r in range(48)]
    temps, ks = [[0.7, 1.0, 1.4][r % 3] for r in range(48)], [[0, 0, 0, 1000][r % 4] for r in range(48)]
    drawn = kernel_tokens(kernel, lanes, logits, temps, ks, top_ps)
    assert int((drawn < 0).sum()) <= 2  # all but rare near-ties decided by the kernel
    want = sampler._torch_draw(logits, temps, ks, top_ps, list(range(48)), [3] * 48)
    decided = drawn >= 0
    assert torch.equal(drawn[decided], want[decided])


def test_the_kernel_leaves_ties_at_the_top_p_cutoff_nan_and_inf_to_the_torch_path(kernel, lanes, monkeypatch):
    tied = torch.tensor([0.0] * 10 + [5.0] + [-1.0] * 5)  # top-p 0.96 cuts inside the ten ties
    logits = torch.stack([tied, tied.clone(), tied.clone(), tied.clone(), tied.clone(), torch.arange(16.0) / 4])
    logits[1, 3] = float("nan")
    logits[2, 4] = float("inf")
    logits[3, :] = float("-inf")
    drawn = kernel_tokens(kernel, lanes, logits, [1.0] * 6, [0] * 6, [0.96, 0.9, 0.9, 0.9, 1.0, 0.9])
    assert drawn.tolist()[:4] == [-1, -1, -1, -1] and int(drawn[4]) >= 0 and int(drawn[5]) >= 0
    batch = SamplingBatch([1.0] * 6, [0] * 6, [0.96, 0.9, 0.9, 0.9, 1.0, 0.9], seeds=list(range(6)),
                          counters=[3] * 6, suppressed=[[] for _ in range(6)])
    assert torch.equal(sample_tokens(logits, batch), torch_path(logits, batch, monkeypatch))


def test_tiny_temperatures_and_suppressed_tokens_draw_as_the_torch_path(kernel, monkeypatch):
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(4)) * 2
    batch = SamplingBatch([1e-4, 1e-30, 1e-4, 0.7, 1e-4, 1e-30, 0.7, 0.7], [0, 0, 5, 5, 0, 3, 300, 0],
                          [1.0, 1.0, 0.9, 0.9, 0.5, 1.0, 1.0, 0.8], seeds=list(range(8)), counters=[1] * 8,
                          suppressed=[[int(logits[r].argmax())] for r in range(8)])
    got = sample_tokens(logits, batch)
    assert torch.equal(got, torch_path(logits, batch, monkeypatch))
    assert got.tolist() == rowwise(logits, batch)
    assert all(int(got[r]) != int(logits[r].argmax()) for r in range(8))  # suppressed before the kernel


def test_rows_masked_to_minus_inf_by_a_logit_processor_draw_as_the_torch_path(kernel, monkeypatch):
    # a grammar mask leaves a few allowed tokens; top-k then may reach into the -inf ones
    logits = torch.randn(12, 3000, generator=torch.Generator().manual_seed(11)) * 3
    allowed = [torch.randperm(3000, generator=torch.Generator().manual_seed(r))[: [3, 40, 600][r % 3]]
               for r in range(12)]
    masked = torch.full_like(logits, float("-inf"))
    for r in range(12):
        masked[r, allowed[r]] = logits[r, allowed[r]]
    batch = SamplingBatch([0.8] * 12, [[0, 50, 5, 0][r % 4] for r in range(12)],
                          [[0.9, 0.9, 1.0, 0.5][r % 4] for r in range(12)], seeds=list(range(12)), counters=[2] * 12,
                          suppressed=[[] for _ in range(12)])
    got = sample_tokens(masked, batch)
    assert torch.equal(got, torch_path(masked, batch, monkeypatch))
    assert all(int(got[r]) in set(allowed[r].tolist()) for r in range(12))


def test_one_and_two_threads_draw_the_same_tokens(kernel):
    logits, batch = settings_batch(64, 700, 6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample_tokens(logits, batch)
        torch.set_num_threads(2)
        two = sample_tokens(logits, batch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("n, scale", [(8, 1.0), (9, 3.0), (41, 10.0), (300, 3.0), (4099, 40.0), (4096, 0.01)])
def test_the_kernels_top_p_softmax_is_torchs_bit_for_bit(kernel, lanes, n, scale):
    # top-p decides from these floats: the kernel must round exactly as torch.softmax on this CPU.
    # Verified on AVX2; elsewhere the sampler checks at run time and keeps the torch path if not.
    if torch.backends.cpu.get_cpu_capability() != "AVX2" and not sampler._softmax_matches(kernel, lanes):
        pytest.skip("torch's softmax sums differently on this CPU: the sampler runs the torch path here")
    row = torch.sort(torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale).values
    out = torch.empty(n)
    kernel.sorted_softmax(row.data_ptr(), out.data_ptr(), n, lanes)
    assert torch.equal(out, row.softmax(-1))


def test_a_kernel_whose_softmax_rounds_differently_is_not_used(kernel, lanes, monkeypatch):
    logits, batch = settings_batch(20, 301, 7)
    wrong = 16 if lanes == 8 else 8  # not how torch sums on this CPU
    assert sampler._softmax_matches(kernel, wrong) is False
    monkeypatch.setattr(sampler, "_SOFTMAX_LANES", {torch.backends.cpu.get_cpu_capability(): wrong})
    assert sampler._native_sampler() is None
    assert sample_tokens(logits, batch).tolist() == rowwise(logits, batch)


def test_without_the_kernel_the_torch_path_draws(monkeypatch):
    logits, batch = settings_batch(20, 301, 7)
    monkeypatch.setattr(native, "load", lambda name: None)
    assert sample_tokens(logits, batch).tolist() == rowwise(logits, batch)


def test_rows_the_kernel_leaves_undecided_are_drawn_by_the_torch_path(kernel, monkeypatch):
    asked = []

    def leave_every_row(kernel, lanes, logits, *settings):
        asked.append(logits.shape[0])
        return torch.full((logits.shape[0],), -1, dtype=torch.int64)

    monkeypatch.setattr(sampler, "_native_draw", leave_every_row)
    logits, batch = settings_batch(20, 301, 8)
    assert sample_tokens(logits, batch).tolist() == rowwise(logits, batch)
    assert asked == [sum(not batch.is_greedy_row(r) for r in range(20))]


def test_logits_other_than_fp32_take_the_torch_path(kernel, monkeypatch):
    logits, batch = settings_batch(10, 200, 9)
    taken = []

    def torch_draw(logits, *settings):
        taken.append(logits.dtype)
        return torch.zeros(logits.shape[0], dtype=torch.int64)

    monkeypatch.setattr(sampler, "_native_draw", lambda *a: pytest.fail("the kernel takes fp32 logits only"))
    monkeypatch.setattr(sampler, "_torch_draw", torch_draw)
    sample_tokens(logits.half(), batch)
    assert taken == [torch.float16]


def test_the_sampling_bench_times_each_kind_with_native_kernels_on_and_off(kernel, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_sampling

    seen = []

    def sample(logits, batch):
        seen.append(native.enabled())
        return sample_tokens(logits, batch)

    monkeypatch.setenv("SPLITFUSE_NATIVE", "1")
    times = bench_sampling.time_sampler(SimpleNamespace(device="cpu", sample=sample), 4, 64, 1, bench_sampling.KINDS)
    assert set(times) == set(bench_sampling.KINDS) and all(t > 0 for t in times.values())
    assert seen == [on for _ in range(2) for _, on in bench_sampling.KINDS.values()]  # warm-up round, then timed
    assert native.enabled()  # the setting it found is back
