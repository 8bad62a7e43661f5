"""Bad input, table-driven: each case gets its 4xx in OpenAI's error format naming the field (param),
and the server goes on answering."""

from __future__ import annotations

import json

import httpx
import pytest

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
LONG_WORDS = "word " * 400  # past the tiny model's 512 tokens


def cmpl(**fields) -> dict:
    return {"prompt": "hi", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"messages": HI, "max_tokens": 2, **fields}


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


# (path, body: dict or raw bytes, status, param)
CASES = [
    # ---- completions: sampling fields
    (CMPL, cmpl(max_tokens=0), 400, "max_tokens"),
    (CMPL, cmpl(max_tokens=-1), 400, "max_tokens"),
    (CMPL, cmpl(max_tokens="ten"), 400, "max_tokens"),
    (CMPL, cmpl(max_tokens=1.5), 400, "max_tokens"),
    (CMPL, cmpl(max_tokens=600), 400, "max_tokens"),
    (CMPL, cmpl(temperature=5), 400, "temperature"),
    (CMPL, cmpl(temperature=-0.1), 400, "temperature"),
    (CMPL, cmpl(temperature="hot"), 400, "temperature"),
    (CMPL, cmpl(top_p=0), 400, "top_p"),
    (CMPL, cmpl(top_p=2), 400, "top_p"),
    (CMPL, cmpl(top_k=-1), 400, "top_k"),
    (CMPL, cmpl(top_k=1.5), 400, "top_k"),
    (CMPL, cmpl(n=0), 400, "n"),
    (CMPL, cmpl(n=17), 400, "n"),
    (CMPL, cmpl(n="two"), 400, "n"),
    (CMPL, cmpl(prompt=[f"p{i}" for i in range(100)], n=16), 400, "n"),
    (CMPL, cmpl(seed=2**64), 400, "seed"),
    (CMPL, cmpl(seed=-(2**64)), 400, "seed"),
    (CMPL, cmpl(seed="x"), 400, "seed"),
    (CMPL, cmpl(logprobs=21), 400, "logprobs"),
    (CMPL, cmpl(logprobs=-1), 400, "logprobs"),
    (CMPL, cmpl(logprobs="x"), 400, "logprobs"),
    (CMPL, cmpl(min_tokens=-1), 400, "min_tokens"),
    (CMPL, cmpl(min_tokens=5), 400, "min_tokens"),
    (CMPL, cmpl(stop=5), 400, "stop"),
    (CMPL, cmpl(stop=["a\ud800"]), 400, "stop"),
    (CMPL, cmpl(stream="perhaps"), 400, "stream"),
    (CMPL, cmpl(stream_options="x"), 400, "stream_options"),
    (CMPL, cmpl(echo="maybe"), 400, "echo"),
    (CMPL, cmpl(ignore_eos="x"), 400, "ignore_eos"),
    (CMPL, cmpl(model="gpt-9"), 404, "model"),
    # ---- completions: the prompt
    (CMPL, without(cmpl(), "prompt"), 400, "prompt"),
    (CMPL, cmpl(prompt=None), 400, "prompt"),
    (CMPL, cmpl(prompt=5), 400, "prompt"),
    (CMPL, cmpl(prompt={"text": "hi"}), 400, "prompt"),
    (CMPL, cmpl(prompt=[]), 400, "prompt"),
    (CMPL, cmpl(prompt=[[]]), 400, "prompt"),
    (CMPL, cmpl(prompt=[1.5]), 400, "prompt"),
    (CMPL, cmpl(prompt=[1, 10**6]), 400, "prompt"),
    (CMPL, cmpl(prompt=[-1]), 400, "prompt"),
    (CMPL, cmpl(prompt=[1] * 600), 400, "prompt"),
    (CMPL, cmpl(prompt="a\ud800b"), 400, "prompt"),
    (CMPL, cmpl(prompt=["fine", "a\udfffb"]), 400, "prompt"),
    (CMPL, cmpl(prompt=LONG_WORDS), 400, "prompt"),
    (CMPL, cmpl(prompt=LONG_WORDS * 20), 400, "prompt"),
    # ---- chat
    (CHAT, without(chat(), "messages"), 400, "messages"),
    (CHAT, chat(messages=[]), 400, "messages"),
    (CHAT, chat(messages="hi"), 400, "messages"),
    (CHAT, chat(messages=[{"content": "hi"}]), 400, "messages"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400, "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400, "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": "a\ud800"}]), 400, "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]), 400, "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": LONG_WORDS}]), 400, "messages"),
    (CHAT, without(chat(messages=[{"role": "user", "content": LONG_WORDS}]), "max_tokens"), 400, "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": LONG_WORDS * 20}]), 400, "messages"),
    (CHAT, chat(max_tokens=0), 400, "max_tokens"),
    (CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    (CHAT, chat(logprobs="x"), 400, "logprobs"),
    (CHAT, chat(top_logprobs=21), 400, "top_logprobs"),
    (CHAT, chat(n=17), 400, "n"),
    (CHAT, chat(temperature=3), 400, "temperature"),
    (CHAT, chat(seed=2**63), 400, "seed"),
    (CHAT, chat(model="nope"), 404, "model"),
    # ---- bodies that are not a JSON object
    (CMPL, b'{"prompt": "hi", ', 400, None),
    (CMPL, b"not json", 400, None),
    (CMPL, b"[]", 400, None),
    (CMPL, b'{"prompt": "\xff\xfe"}', 400, None),
    (CMPL, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    (CHAT, b'{"messages": [{"role": "user", "content": "\xc3"}]}', 400, None),
]


@pytest.fixture(scope="module")
def http(start_server):
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("path,body,status,param", CASES, ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_bad_input_is_refused_naming_the_field(http, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["message"] and "internal error" not in error["message"]
    if param is not None:
        assert param in error["message"] or error["code"] in ("context_length_exceeded", "model_not_found"), error
    assert http.get("/health").status_code == 200  # the same kept-alive connection still answers
