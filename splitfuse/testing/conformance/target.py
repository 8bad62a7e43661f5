"""What a conformance run checks, from the command line options (see splitfuse.testing.pytest_plugin)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DEFAULT_BACKEND = "cpu"
DEFAULT_ARCH = "llama"


@dataclass(frozen=True)
class Target:
    backend: str = DEFAULT_BACKEND
    arch: str = DEFAULT_ARCH  # an HF architecture name or a splitfuse.testing tiny-model key
    arch_config: dict = field(default_factory=dict)  # config values for make_tiny_model
    quick: bool = False  # a small subset, for slow backends
    check_ops: bool = True  # False when only an architecture was asked about

    def describe(self) -> str:
        ops = f"{self.backend} ops against the cpu reference, " if self.check_ops else ""
        subset = " (quick subset)" if self.quick else ""
        return f"splitfuse conformance: {ops}{self.arch} on {self.backend} against HF transformers{subset}"


def target_from_config(config) -> Target:
    """An architecture given alone asks about a model (run on the cpu backend), so the backend ops
    are left out; a backend given alone, both, or neither check everything."""
    backend = config.getoption("splitfuse_backend", default=None)
    arch = config.getoption("splitfuse_arch", default=None)
    return Target(
        backend=backend or DEFAULT_BACKEND,
        arch=arch or DEFAULT_ARCH,
        arch_config=_json_object(config.getoption("splitfuse_arch_config", default=None)),
        quick=bool(config.getoption("splitfuse_quick", default=False)),
        check_ops=backend is not None or arch is None,
    )


def _json_object(text: str | None) -> dict:
    if not text:
        return {}
    import pytest

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise pytest.UsageError(f"--splitfuse-arch-config must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise pytest.UsageError(f"--splitfuse-arch-config must be a JSON object, got {text!r}")
    return value
