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


@pytest.fixture(scope="module")
def demo_client(request):
    """An openai client of the demo model served on cpu in fp32 as "demo"; a test module's
    CHAT_TEMPLATE, if it sets one, is the server's chat template."""
    import openai

    import splitfuse

    handle = splitfuse.serve(None, backend="cpu", dtype="float32", served_model_name="demo",
                             chat_template=getattr(request.module, "CHAT_TEMPLATE", None))
    yield openai.OpenAI(base_url=handle.url + "/v1", api_key="none", max_retries=0, timeout=120)
    handle.terminate()
