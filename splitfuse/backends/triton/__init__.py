"""The Triton kernel library shared by the cuda and xpu backends, one module per op (plus norm.py,
the kernel both norms run, and common.py, the host-side helpers).

Each op module imports triton; import them only where triton is available. This package itself
imports nothing heavy: `triton_import_error()` probes triton for the backends' availability.
"""

from __future__ import annotations

import importlib


def triton_import_error() -> str:
    """'' when triton imports, else why not (one line for `splitfuse backends`)."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        if getattr(exc, "name", None) == "triton":
            return "triton is not installed (pip install triton)"
        return f"triton cannot be imported: {exc}"
    except Exception as exc:  # a broken install must not break `splitfuse backends`
        return f"triton cannot be imported: {type(exc).__name__}: {exc}"
    return ""
