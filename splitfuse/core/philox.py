"""Counter-based noise on the CPU, equal to the Triton sampling kernel's: Philox-4x32-10 as
`tl.randint(seed, offset)` computes it (triton 3.6), and the kernel's uniform -> Exp(1) transform.

Every value is a uint32 held in an int64 tensor; a round's 32 x 32-bit products are int64
multiplies that wrap modulo 2^64 (their low 64 bits, all a round needs, stay exact). The noise of (seed, offset) is a pure function: any backend, any batch.
The integers are bit-exact; the float transform is the same formula, whose log may differ by an
ulp between libraries (torch here, numpy under the interpreter, the GPU's own log), so tokens
could differ only where two tokens' keys tie within that.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
# Philox-4x32 round multipliers and Weyl key increments (triton.language.random.philox_impl)
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10


def seed_to_int64(seed: int) -> int:
    """The low 64 bits of a seed as a signed int64 (the kernel's seed tensor holds these bits)."""
    bits = seed & _MASK64
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def _key_words(seed: int | torch.Tensor):
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64)
        return seed & _MASK32, (seed >> 32) & _MASK32
    seed &= _MASK64
    return seed & _MASK32, seed >> 32


def _rounds(seed: int | torch.Tensor, offsets: torch.Tensor, word0_only: bool) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10's words; with word0_only, word 0 alone, skipping the work only others need.

    A round multiplies uint32 words by uint32 constants: the int64 product wraps modulo 2^64, which
    keeps its low 64 bits exact, so its high word is (p >> 32) & mask and its low word p & mask.
    The low words (c1, c3) and the Weyl keys are left unmasked: they only enter xors that are
    masked before the next multiply. In-place ops reuse the round's temporaries."""
    k0, k1 = _key_words(seed)
    offsets = offsets.to(torch.int64)
    if isinstance(seed, torch.Tensor):  # the in-place ops below need the result's shape up front
        offsets = offsets.expand(torch.broadcast_shapes(offsets.shape, seed.shape))
    c0 = offsets & _MASK32
    # round 1 has c2 = c3 = 0, so its B product is 0
    low_a = c0.mul_(_ROUND_A)
    c0 = (offsets >> 32).bitwise_and_(_MASK32).bitwise_xor_(k0)
    c2 = (low_a >> 32).bitwise_xor_(k1).bitwise_and_(_MASK32)
    c1, c3 = torch.zeros_like(offsets), low_a
    for round_ in range(1, _ROUNDS):
        k0, k1 = k0 + _KEY_A, k1 + _KEY_B
        low_b = c2.mul_(_ROUND_B)
        if word0_only and round_ == _ROUNDS - 1:
            return ((low_b >> 32).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32),)
        low_a = c0.mul_(_ROUND_A)
        c0 = (low_b >> 32).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        c2 = (low_a >> 32).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c1, c3 = low_b, low_a
    return c0, c1 & _MASK32, c2, c3 & _MASK32


def philox(seed: int | torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four uint32 words (int64 tensors) of Philox-4x32-10 keyed by the 64-bit seed(s), at the
    64-bit offsets (counter words: offset low, offset high, 0, 0), as `tl.randint4x`."""
    return _rounds(seed, offsets, word0_only=False)


def randint(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`tl.randint(seed, offsets)` for int64 offsets: uint32 values in an int64 tensor."""
    return _rounds(seed, offsets, word0_only=True)[0]


def exponential(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [offsets' shape] float32, as the sampling kernel turns randint into E."""
    # u in (0, 1) from the top 31 bits, +2^-32 so u > 0; small u take the series for
    # -log(1 - u), which float32 cannot evaluate there; u that round to 1 are clamped
    # (splitfuse/backends/triton/sampling.py explains each step: keep the two in step)
    u = (randint(seed, offsets) >> 1).to(torch.float32) * 2.0**-31 + 2.0**-32
    series = u * (1.0 + 0.5 * u)
    log_form = -torch.log(torch.clamp(1.0 - u, min=2.0**-26))
    return torch.where(u < 1.0e-3, series, log_form)


def noise_offsets(counter: int, vocab: int) -> torch.Tensor:
    """Counter offsets [vocab] of one draw: draw `counter` of a seed uses counter * vocab + token."""
    return torch.arange(vocab, dtype=torch.int64) + counter * vocab


__all__ = ["exponential", "noise_offsets", "philox", "randint", "seed_to_int64"]
