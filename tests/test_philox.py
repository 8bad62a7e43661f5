"""core.philox equals Triton's tl.randint bit for bit (under the interpreter without a GPU)."""

from __future__ import annotations

import pytest
import torch

from splitfuse.core.philox import exponential, noise_offsets, philox, randint, seed_to_int64

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

# every 64-bit corner of the key: zero, one, the largest int64, negative bit patterns (the high
# word's top bit set), and words that are all ones
SEEDS = [0, 1, 2**63 - 1, -1, -(2**63), 0x9E3779B97F4A7C15 - 2**64, 0xFFFFFFFF, 1 << 32, 123456789]
# offsets across the 32-bit boundary (the high counter word), large draw counters, and 0
OFFSETS = [0, 1, 2, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 3 * 2**40 + 5, 2**62 + 12345,
           2**63 - 1, 1_000_003 * 151_936 + 151_935]


@triton.jit
def _randint_kernel(seed_ptr, offsets_ptr, out_ptr, N, BLOCK: tl.constexpr):
    # the sampling kernel's types: seed loaded from an int64 tensor, int64 offsets
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    seed = tl.load(seed_ptr)
    offsets = tl.load(offsets_ptr + cols, mask=mask, other=0)
    tl.store(out_ptr + cols, tl.randint(seed, offsets).to(tl.int64), mask=mask)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _triton_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    dev = _device()
    out = torch.empty(offsets.numel(), dtype=torch.int64, device=dev)
    seed_t = torch.tensor([seed_to_int64(seed)], dtype=torch.int64, device=dev)
    _randint_kernel[(1,)](seed_t, offsets.to(dev), out, offsets.numel(),
                          BLOCK=triton.next_power_of_2(offsets.numel()))
    return out.cpu()


@pytest.mark.parametrize("seed", SEEDS)
def test_randint_equals_triton(seed):
    offsets = torch.tensor(OFFSETS + list(range(3, 40)), dtype=torch.int64)
    assert randint(seed, offsets).tolist() == _triton_randint(seed, offsets).tolist()


def test_seed_tensors_give_the_same_words_as_int_seeds():
    offsets = torch.tensor(OFFSETS, dtype=torch.int64)
    seeds = torch.tensor([seed_to_int64(s) for s in SEEDS], dtype=torch.int64)[:, None]
    by_row = randint(seeds, offsets.expand(len(SEEDS), -1))
    assert by_row.tolist() == [randint(s, offsets).tolist() for s in SEEDS]


def test_seeds_are_taken_modulo_2_to_the_64():
    assert seed_to_int64(2**64 + 5) == 5 and seed_to_int64(2**64 - 1) == -1 and seed_to_int64(-3) == -3
    offsets = torch.arange(10, dtype=torch.int64)
    assert randint(2**64 + 5, offsets).tolist() == randint(5, offsets).tolist()


def test_values_are_uint32_and_look_uniform():
    r = randint(7, torch.arange(200_000, dtype=torch.int64))
    assert int(r.min()) >= 0 and int(r.max()) < 2**32
    assert abs(r.double().mean().item() / 2**32 - 0.5) < 0.005
    assert r.unique().numel() > 199_990  # a 32-bit draw repeats only by the birthday bound


def test_exponential_has_mean_one_and_is_positive():
    e = exponential(3, noise_offsets(5, 100_000))
    assert e.dtype == torch.float32 and bool((e > 0).all())
    assert abs(e.double().mean().item() - 1.0) < 0.02
    assert abs(e.double().var().item() - 1.0) < 0.05
    # one draw's offsets are counter * vocab + token: draws never share noise
    assert noise_offsets(2, 5).tolist() == [10, 11, 12, 13, 14]


def test_a_column_of_seeds_broadcasts_against_one_row_of_offsets():
    offsets = torch.tensor(OFFSETS, dtype=torch.int64)
    seeds = torch.tensor([seed_to_int64(s) for s in SEEDS], dtype=torch.int64)[:, None]
    words = philox(seeds, offsets)
    assert [w.shape for w in words] == [(len(SEEDS), len(OFFSETS))] * 4
    assert [w.tolist() for w in words] == [[philox(s, offsets)[i].tolist() for s in SEEDS] for i in range(4)]
