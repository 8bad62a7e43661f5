"""Shared by the architecture tests: each module names its tiny models in VARIANTS."""

from __future__ import annotations

import pytest

from splitfuse.testing.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    """name -> directory of that tiny model from the test module's VARIANTS (name -> (arch,
    overrides)), built on first use."""
    variants = request.module.VARIANTS
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            arch, overrides = variants[name]
            built[name] = str(make_tiny_model(tmp_path_factory.mktemp(name), arch, **overrides))
        return built[name]

    return get
