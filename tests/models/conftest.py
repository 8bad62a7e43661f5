"""Shared by the architecture tests: each module names its tiny models in VARIANTS."""

from __future__ import annotations

import pytest

from splitfuse.testing.tiny_model import tiny_model_builder


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    """name -> directory of that tiny model from the test module's VARIANTS (name -> (arch,
    overrides)), built on first use."""
    return tiny_model_builder(tmp_path_factory, request.module.VARIANTS)
