"""The batched sampling kernel (splitfuse/backends/triton/sampling.py) and CudaBackend.sample, against core.sampler."""

from __future__ import annotations

import math

import pytest
import torch

from splitfuse.backends.triton.sampling import filter_thresholds, sample
from splitfuse.core.sampler import SamplingBatch, _filtered_probs, sample_tokens


def _rows(device, n, temp=1.0, top_k=0, top_p=1.0, seed=0, offsets=None):
    """Per-row tensors for n rows with the same settings; offsets default to 0..n-1."""
    return dict(
        temperatures=torch.full((n,), temp, dtype=torch.float32, device=device),
        top_ks=torch.full((n,), top_k, dtype=torch.int32, device=device),
        top_ps=torch.full((n,), top_p, dtype=torch.float32, device=device),
        seeds=torch.full((n,), seed, dtype=torch.int64, device=device),
        offsets=(torch.arange(n) if offsets is None else torch.as_tensor(offsets)).to(device, torch.int64),
    )


def _cat(*parts):
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _logits(v, seed, scale=2.0):
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * scale


# (temperature, top_k, top_p): plain temperature, top-k, top-p, both, and a tiny top-p
FILTERS = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.7), (1.0, 0, 0.05)]


def test_greedy_is_argmax_with_ties(device):
    V = 300
    logits = torch.stack([_logits(V, s) for s in range(4)])
    logits[1, [37, 250]] = 50.0  # a tie in different tiles (block 64): lowest index wins
    logits[2, [70, 71]] = 50.0  # a tie within one tile
    logits[3] = float("-inf")  # nothing finite: token 0, like torch.argmax
    logits = logits.to(device)
    args = _rows(device, 4, temp=0.0)
    args["temperatures"][0] = 0.8  # temperature with top_k 1 is greedy too
    args["top_ks"][0] = 1
    for block in (64, None):
        got = sample(logits, **args, block_size=block)
        assert got.dtype == torch.int64 and got.device == logits.device
        assert got.tolist() == logits.argmax(-1).tolist() == [logits[0].argmax().item(), 37, 70, 0]


@pytest.mark.parametrize("temp,top_k,top_p", FILTERS, ids=str)
def test_thresholds_give_the_reference_kept_set(device, temp, top_k, top_p):
    V = 300
    logits = torch.stack([_logits(V, s) for s in range(6)]).to(device)
    args = _rows(device, 6, temp, top_k, top_p)
    thr = filter_thresholds(logits, args["temperatures"], args["top_ks"], args["top_ps"])
    for row in range(6):
        ref = _filtered_probs(logits[row].cpu(), temp, top_k, top_p) > 0
        assert torch.equal(logits[row].cpu() >= thr[row].cpu(), ref), row
    # rows= limits the work to the filtering rows; the others keep everything
    thr2 = filter_thresholds(logits, args["temperatures"], args["top_ks"], args["top_ps"],
                             rows=torch.tensor([1, 4], device=device))
    assert torch.equal(thr2[[1, 4]], thr[[1, 4]])
    assert torch.isneginf(thr2[[0, 2, 3, 5]]).all()


def test_top_k_keeps_every_token_tied_at_the_kth_value(device):
    # top-k masks `scaled < kth`, as the reference: all tokens equal to the k-th value stay
    logits = torch.tensor([[0.0, 3.0, 2.0, 2.0, 2.0, 1.0, 3.0, -1.0]])
    args = _rows(device, 1, 1.0, 3, 1.0)
    thr = filter_thresholds(logits.to(device), args["temperatures"], args["top_ks"], args["top_ps"])
    kept = (logits[0] >= thr.cpu()[0]).nonzero().flatten().tolist()
    assert kept == [1, 2, 3, 4, 6]  # 5 tokens for k = 3
    assert kept == (_filtered_probs(logits[0], 1.0, 3, 1.0) > 0).nonzero().flatten().tolist()


def test_top_p_keeps_every_token_tied_at_the_cutoff(device):
    # Two tokens of mass 0.4 and one of 0.2: top_p 0.5 needs one 0.4 token, ties keep both (the
    # reference keeps whichever its sort put last); top_p 0.3 the same; 0.9 all three.
    logits = torch.tensor([[math.log(0.4), math.log(0.2), math.log(0.4)]]).to(device)
    for top_p, want in [(0.3, [0, 2]), (0.5, [0, 2]), (0.9, [0, 1, 2])]:
        args = _rows(device, 1, 1.0, 0, top_p)
        thr = filter_thresholds(logits, args["temperatures"], args["top_ks"], args["top_ps"])
        assert (logits[0] >= thr[0]).nonzero().flatten().tolist() == want, top_p


def test_draws_stay_in_the_kept_set(device):
    V, n = 300, 150  # per filter setting, draws 0..n-1 of one seed: all in one launch
    logits = _logits(V, 11)
    parts = [_rows(device, n, *f, seed=1234 + i) for i, f in enumerate(FILTERS)]
    got = sample(logits.expand(n * len(FILTERS), V).contiguous().to(device), **_cat(*parts), block_size=128)
    for i, f in enumerate(FILTERS):
        allowed = _filtered_probs(logits, *f) > 0
        drawn = got[i * n:(i + 1) * n].cpu()
        assert allowed[drawn].all(), f
        if allowed.sum() > 1:
            assert drawn.unique().numel() > 1, f  # it samples, not argmax


def test_frequencies_match_the_filtered_distribution(device):
    # N draws (offsets 0..N-1) of each setting in ONE launch. Tolerance: each token's frequency
    # within 4.5 binomial standard deviations of its probability (+1e-3 for p ~ 0), i.e. a false
    # alarm rate ~1e-5 per token for a correct sampler; the seeds are fixed, so the test is
    # deterministic anyway. Settings cover temperature < 1 and > 1, top-k and top-p.
    V, N = 16, 3000
    logits = _logits(V, 3, scale=1.5)
    settings = [(0.6, 0, 1.0), (1.7, 0, 1.0), (1.0, 6, 1.0), (0.9, 0, 0.75), (1.2, 8, 0.9)]
    parts = [_rows(device, N, *s, seed=99 + 7 * i) for i, s in enumerate(settings)]
    got = sample(logits.expand(N * len(settings), V).contiguous().to(device), **_cat(*parts)).cpu()
    for i, s in enumerate(settings):
        p = _filtered_probs(logits, *s).double()
        freq = torch.bincount(got[i * N:(i + 1) * N], minlength=V).double() / N
        tol = 4.5 * (p * (1 - p) / N).sqrt() + 1e-3
        assert ((freq - p).abs() <= tol).all(), (s, (freq - p).abs().max().item())
        assert freq[p == 0].sum() == 0, s


def test_same_seed_and_offset_same_token_in_any_batch(device):
    # a flat distribution over 300 tokens: tokens say a lot about the noise that picked them
    V = 300
    flat = (torch.randn(V, generator=torch.Generator().manual_seed(5)) * 0.1)
    alone = [sample(flat.view(1, V).to(device), **_rows(device, 1, 1.0, 0, 1.0, seed=s, offsets=[o])).item()
             for s, o in [(7, 0), (7, 3), (8, 3), (2**63 - 1, 2**40)]]
    # crowded: shuffled among other rows (greedy, top-k, other seeds, other logits), other row
    # positions and another batch size (so another rows-per-program split)
    other = torch.stack([_logits(V, 50 + i) for i in range(5)])
    logits = torch.cat([other[:2], flat.view(1, V), other[2:3], flat.view(1, V), flat.view(1, V),
                        other[3:], flat.view(1, V)]).to(device)
    args = _rows(device, 9, 1.0, 0, 1.0, seed=3, offsets=[0] * 9)
    for row, (s, o) in zip([8, 2, 4, 5], [(2**63 - 1, 2**40), (7, 3), (8, 3), (7, 0)]):
        args["seeds"][row], args["offsets"][row] = s, o
    args["temperatures"][0] = 0.0
    args["top_ks"][3] = 10
    args["top_ps"][1] = 0.5
    crowded = sample(logits, **args).tolist()
    assert [crowded[r] for r in (5, 2, 4, 8)] == alone
    # and the same batch twice gives the same tokens
    assert sample(logits, **args).tolist() == crowded


def test_different_seeds_and_offsets_differ(device):
    V = 300
    flat = torch.zeros(6, V, device=device)  # uniform: any token is as likely as any other
    by_seed = sample(flat, **_rows(device, 6, 1.0, seed=0, offsets=[0] * 6) | {
        "seeds": torch.arange(6, device=device) * 1000 + 1}).tolist()
    by_offset = sample(flat, **_rows(device, 6, 1.0, seed=1)).tolist()
    assert len(set(by_seed)) >= 5 and len(set(by_offset)) >= 5  # collisions: ~5% chance per pair set
    # uint64 seeds past 2^63 arrive as negative int64 and are valid keys
    neg = sample(flat[:2], **_rows(device, 2, 1.0, seed=-1)).tolist()
    assert all(0 <= t < V for t in neg)


def test_suppressed_ids_are_never_drawn(device):
    V, n = 40, 200
    logits = torch.full((n, V), -2.0)
    logits[:, [3, 17]] = 8.0  # the suppressed ids carry nearly all the mass
    args = _rows(device, n, 1.0, 0, 1.0, seed=42)
    args["temperatures"][:10] = 0.0  # greedy rows are masked too
    args["top_ps"][10:20] = 0.5
    args["top_ks"][20:30] = 2
    ids = torch.tensor([[3, 17, -1], [17, 3, 3]]).repeat(n // 2, 1)  # padding and duplicates
    got = sample(logits.to(device), **args, suppressed=ids.to(device)).cpu()
    assert not torch.isin(got, torch.tensor([3, 17])).any()
    assert got.unique().numel() > 10  # the remaining 38 tokens share the draws
    # top-k 2 on the suppressed logits: the two largest are all tied at -2, so all 38 stay
    assert got[20:30].unique().numel() > 2


def test_input_checks(device):
    logits = torch.zeros(2, 8, device=device)
    good = _rows(device, 2)
    with pytest.raises(TypeError):
        sample(logits.double(), **good)
    with pytest.raises(ValueError):
        sample(logits[0], **good)
    with pytest.raises(ValueError):
        sample(logits, **(good | {"seeds": good["seeds"][:1]}))
    with pytest.raises(TypeError):
        sample(logits, **(good | {"top_ks": good["top_ps"]}))
    with pytest.raises(ValueError):
        sample(logits, **good, block_size=48)
    assert sample(logits[:0], **_rows(device, 0)).shape == (0,)


# ---- CudaBackend.sample -------------------------------------------------------------------------

def _backend():
    from splitfuse.backends.cuda.backend import CudaBackend

    return CudaBackend()


def _batch(seeds, temps, top_ks, top_ps, suppressed=None, counters=None):
    return SamplingBatch(
        temperatures=temps, top_ks=top_ks, top_ps=top_ps, seeds=seeds,
        counters=counters or [0] * len(seeds), suppressed=suppressed or [[] for _ in seeds],
    )


def test_backend_sample_reproducible_and_stateless():
    V = 300
    logits = torch.zeros(4, V)  # uniform
    logits[3] = _logits(V, 1)
    settings = ([11, 12, None, 13], [1.0, 0.8, 0.0, 1.0], [0, 50, 0, 0], [1.0, 1.0, 1.0, 0.9])

    def run(backend):
        # two steps: draw 0, then draw 1 of every row
        return [backend.sample(logits.to(backend.device), _batch(*settings, counters=[c] * 4)).tolist()
                for c in (0, 1)]

    backend = _backend()
    a = run(backend)
    assert run(backend) == a == run(_backend())  # same (seed, counter), same tokens: no hidden state
    assert a[0] != a[1]  # the counter moved: a fresh draw
    assert a[0][2] == a[1][2] == logits[2].argmax().item()  # the greedy row
    # a row drawn alone matches the same request's draw in the batch
    alone = backend.sample(logits[:1].to(backend.device), _batch([11], [1.0], [0], [1.0], counters=[1]))
    assert alone.tolist() == [a[1][0]]


def test_backend_sample_needs_a_seed_for_sampled_rows():
    with pytest.raises(ValueError, match="row 0 samples .* seed is None"):
        _backend().sample(torch.zeros(1, 8), _batch([None], [1.0], [0], [1.0]))


@pytest.mark.parametrize("temp,top_k,top_p", FILTERS + [(1.0, 0, 1.0)], ids=str)
def test_backend_and_cpu_sampler_draw_the_same_tokens(temp, top_k, top_p):
    # the cpu sampler reproduces the kernel's Philox noise and exponential race key for key:
    # every row of every setting picks the same token (seeds of every 64-bit kind, counters big
    # and small), on peaked logits and on nearly flat ones, where the noise decides (flat, not
    # uniform: exact ties at the top-p cutoff are the one documented difference of kept sets)
    V, n = 300, 24
    logits = torch.stack([_logits(V, 70 + i, scale=2.0 if i < n // 2 else 0.05) for i in range(n)])
    seeds = [0, 1, 2**63 - 1, -1, -(2**63), 2**64 - 5, 12345, 2**40 + 3] * 3
    counters = [0, 1, 2, 7, 100, 2**20, 2**33 + 1, 5] * 3
    suppressed = [[int(logits[r].argmax())] if r % 5 == 0 else [] for r in range(n)]
    batch = _batch(seeds, [temp] * n, [top_k] * n, [top_p] * n, suppressed, counters)
    backend = _backend()
    on_backend = backend.sample(logits.to(backend.device), batch).cpu().tolist()
    assert on_backend == sample_tokens(logits, batch).tolist()
    assert len(set(on_backend[n // 2:])) > 1  # the noise decided, not an argmax


def test_backend_sample_greedy_and_suppression():
    backend = _backend()
    logits = _logits(50, 2).view(1, 50).repeat(3, 1).to(backend.device)
    top = logits[0].argmax().item()
    greedy = _batch([None] * 3, [0.0, 0.0, 0.5], [0, 0, 1], [1.0] * 3)
    assert backend.sample(logits, greedy).tolist() == [top] * 3  # fast path
    suppressed = _batch([None, 5, None], [0.0, 1.0, 0.0], [0, 3, 0], [1.0] * 3, [[top], [top], []])
    got = backend.sample(logits, suppressed).tolist()
    second = logits[0].topk(2).indices[1].item()
    assert got[0] == second and got[1] != top and got[2] == top
