"""Tokenizing runs off the event loop, and a prompt far past the model's length is not tokenized whole."""

from __future__ import annotations

import threading
import time

import httpx

from splitfuse.serving.tokenize_async import PromptTooLong, encode_bounded
from splitfuse.testing.tiny_model import build_tokenizer


class CountingTokenizer:
    def __init__(self) -> None:
        self.inner, self.chars = build_tokenizer(), 0

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.inner(text, **kwargs)


def test_a_prompt_far_too_long_is_refused_after_a_bounded_prefix():
    tokenizer = CountingTokenizer()
    text = "the quick brown fox " * 50_000  # a million characters
    try:
        encode_bounded(tokenizer, text, max_model_len=512)
        raise AssertionError("a million characters fit in 512 tokens")
    except PromptTooLong as exc:
        assert exc.num_tokens > 512 and "maximum context length is 512" in str(exc)
    assert tokenizer.chars <= 4 * 512 * (1 + 4 + 16)  # a few prefixes, nothing near the whole text


def test_a_prompt_that_fits_is_tokenized_as_a_whole():
    tokenizer = CountingTokenizer()
    text = "naïve café " * 300  # longer than the first prefix, yet within the limit
    assert encode_bounded(tokenizer, text, max_model_len=4096) == tokenizer.inner(text)["input_ids"]


def test_a_huge_prompt_neither_freezes_health_nor_takes_long(start_server):
    server = start_server()
    slowest, stop = [0.0], threading.Event()

    def poll_health() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                start = time.perf_counter()
                assert http.get(server.url + "/health").status_code == 200
                slowest[0] = max(slowest[0], time.perf_counter() - start)
                time.sleep(0.01)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        start = time.perf_counter()
        reply = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"prompt": "hello world, the quick brown fox " * 118_000, "max_tokens": 4})
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        poller.join()
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    assert reply.json()["error"]["param"] == "prompt"
    assert elapsed < 3.0  # tokenizing the whole 3.9 MB takes several seconds
    assert slowest[0] < 1.0
