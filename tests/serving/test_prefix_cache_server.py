"""The server reuses cached prompt prefixes and says so as OpenAI does (usage.prompt_tokens_details
.cached_tokens) and in /metrics; --no-prefix-caching turns it off."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

import splitfuse

SYSTEM = list(range(10, 50))  # 40 tokens: 10 blocks of 4


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    handle = splitfuse.serve(tiny_model_dir("llama"), backend="cpu", kv_block_size=4, num_kv_blocks=256,
                             served_model_name="llama")
    yield handle
    handle.terminate()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


def test_a_repeated_prefix_is_reported_as_cached_tokens(server, client):
    cached_before = metric(server, "splitfuse_prompt_tokens_cached_total")
    computed_before = metric(server, "splitfuse_prompt_tokens_computed_total")
    first = client.completions.create(model="llama", prompt=SYSTEM + [60, 61, 62], max_tokens=3, temperature=0)
    second = client.completions.create(model="llama", prompt=SYSTEM + [70, 71], max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens == 43 and first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens == 42 and second.usage.prompt_tokens_details.cached_tokens == 40
    assert metric(server, "splitfuse_prompt_tokens_cached_total") - cached_before == 40
    assert metric(server, "splitfuse_prompt_tokens_computed_total") - computed_before == 43 + 2


def test_streamed_chat_usage_reports_cached_tokens(server, client):
    messages = [{"role": "system", "content": "You are a careful assistant " * 6},
                {"role": "user", "content": "hello"}]
    client.chat.completions.create(model="llama", messages=messages, max_tokens=2, temperature=0)
    stream = client.chat.completions.create(model="llama", messages=messages, max_tokens=2, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1
    cached = usage[0].prompt_tokens_details.cached_tokens
    # the whole prompt was sent before: all its full blocks but the one holding the last token
    assert cached == (usage[0].prompt_tokens - 1) // 4 * 4 and cached > 0


def test_with_prefix_caching_off_nothing_is_cached(tiny_model_dir):
    handle = splitfuse.serve(tiny_model_dir("llama"), backend="cpu", kv_block_size=4, num_kv_blocks=256,
                             served_model_name="llama", enable_prefix_caching=False)
    try:
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key="none", max_retries=0, timeout=30)
        for _ in range(2):
            reply = client.completions.create(model="llama", prompt=SYSTEM + [60], max_tokens=2, temperature=0)
            assert reply.usage.prompt_tokens_details.cached_tokens == 0
        assert metric(handle, "splitfuse_prompt_tokens_cached_total") == 0
    finally:
        handle.terminate()
