"""The HF baselines run where splitfuse's backend runs, asked of the backend class, not of torch."""

from __future__ import annotations

import pytest

from splitfuse.backends.base import Backend
from splitfuse.bench.runner import BenchOptions, hf_settings


@pytest.mark.parametrize("device_type, engine, want", [
    ("cpu", {}, ("cpu", "float32")),
    ("cuda", {}, ("cuda", "bfloat16")),
    ("cuda", {"dtype": "float16"}, ("cuda", "float16")),  # the engine's dtype when one is given
])
def test_auto_follows_the_backends_device_type(monkeypatch, device_type, engine, want):
    class Fake(Backend):
        name = "fake"

        @classmethod
        def device_type(cls) -> str:
            return device_type

    from splitfuse.backends import selection

    asked = []
    monkeypatch.setattr(selection, "backend_class", lambda name: asked.append(name) or Fake)
    assert hf_settings(BenchOptions(out="unused", backend="fake", engine=engine)) == want
    assert asked == ["fake"]


def test_a_given_device_and_dtype_win():
    options = BenchOptions(out="unused", backend="cpu", hf_device="cuda:1", hf_dtype="float32")
    assert hf_settings(options) == ("cuda:1", "float32")
