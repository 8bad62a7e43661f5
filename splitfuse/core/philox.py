"""Counter-based noise on the CPU, equal to the Triton sampling kernel's: Philox-4x32-10 as
`tl.randint(seed, offset)` computes it (triton 3.6), and the kernel's uniform -> Exp(1) transform.

Every value is a uint32 held in an int64 tensor; products are split in 16-bit halves so that no
int64 operation overflows. The noise of (seed, offset) is a pure function: any backend, any batch.
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


def _mul32(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of multiplier * x for a uint32 constant and uint32 values."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    hi_part, lo_part = multiplier * x_hi, multiplier * x_lo  # each < 2^48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (lo_part + ((hi_part & 0xFFFF) << 16)) & _MASK32
    return high, low


def philox(seed: int | torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four uint32 words (int64 tensors) of Philox-4x32-10 keyed by the 64-bit seed(s), at the
    64-bit offsets (counter words: offset low, offset high, 0, 0), as `tl.randint4x`."""
    offsets = offsets.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64)
        k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    else:
        seed &= _MASK64
        k0, k1 = seed & _MASK32, seed >> 32
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(offsets)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def randint(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`tl.randint(seed, offsets)` for int64 offsets: uint32 values in an int64 tensor."""
    return philox(seed, offsets)[0]


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
