"""Assertions the kernel tests share (this folder is on sys.path when pytest imports its tests)."""

from __future__ import annotations

import torch


def assert_outputs_close(got, ref, tol: dict) -> None:
    """An op's output(s) against the reference's: a tensor or a tuple of tensors (normed, x + residual),
    each with the same dtype and shape, and close within tol (rtol/atol)."""
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g.float(), r.float(), **tol)
