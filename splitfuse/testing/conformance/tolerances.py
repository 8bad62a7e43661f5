"""How close a backend op must come to the cpu reference op, per dtype, and why.

Both sides get identical inputs in the dtype under test; the reference computes in float32 where
HF does and rounds once at the end.
"""

from __future__ import annotations

import torch

TOLERANCES = {
    # Same float32 math; only the summation order may differ (tiled dot products, online softmax,
    # another BLAS), which moves results by a few ulps: far inside 1e-5.
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    # 8-bit mantissa: one rounding is 2**-9 relative. A kernel may round once or twice more than the
    # reference (softmax weights for the P@V product, the normalised value before the weight), so
    # allow about four ulps on outputs of magnitude ~1: 2e-2.
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    # 11-bit mantissa, the same reasoning: 2**-12 per rounding, about four ulps: 2e-3.
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

DTYPES = tuple(TOLERANCES)


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """got (on any device) against expected (cpu) within dtype's tolerance; NaN must match NaN."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    torch.testing.assert_close(got.detach().cpu().float(), expected.float(), equal_nan=True,
                               msg=lambda m: f"{what} ({dtype}): {m}", **TOLERANCES[dtype])
