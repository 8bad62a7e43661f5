"""Fixtures of the serving tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fail_once(monkeypatch):
    """fail_once(owner, name, message): owner.name raises RuntimeError(message) on its next call
    only, then behaves as before (a step that fails once, and an engine that goes on)."""

    def install(owner, name: str, message: str) -> None:
        original = getattr(owner, name)
        calls = []

        def broken_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError(message)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, broken_once)

    return install
