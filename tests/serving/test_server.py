"""A real server on loopback, driven by the official openai client and httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

import splitfuse
from splitfuse.testing.server import wait_idle

KEY = "test-key"
MAX_BODY = 64 * 1024
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    handle = splitfuse.serve(tiny_model_dir("llama"), backend="cpu", kv_block_size=16, num_kv_blocks=512,
                             api_key=KEY, max_body_bytes=MAX_BODY, served_model_name="llama")
    yield handle
    handle.terminate()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", num_kv_blocks=64, kv_block_size=16)


def _post(server, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30, **kwargs)


# ---- happy paths -------------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["llama"]


def test_served_name_defaults_to_the_directory_name(tiny_model_dir):
    from pathlib import Path

    from splitfuse.serving.server import build_app

    app, engine = build_app(tiny_model_dir("llama"), "cpu", num_kv_blocks=8)
    try:
        assert app.state.handlers.model_name == Path(tiny_model_dir("llama")).name
    finally:
        engine.close()


def test_requests_without_sampling_fields_take_the_models_defaults(client, pipe):
    """The tiny model's generation_config.json does not sample: the server and the pipeline both
    start from that, so a request that sets no temperature is greedy in both."""
    want = pipe(PROMPT, max_new_tokens=12)[0]
    got = client.completions.create(model="llama", prompt=PROMPT, max_tokens=12)
    assert pipe.sampling_params().temperature == 0.0
    assert got.choices[0].text == want.text


def test_completion_equals_pipeline_greedy(client, pipe):
    want = pipe(PROMPT, max_new_tokens=12, temperature=0)[0]
    got = client.completions.create(model="llama", prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(pipe.encode(PROMPT))
    assert got.usage.completion_tokens == want.generated_length
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_token_id_prompts_and_echo(client, pipe):
    ids = pipe.encode(PROMPT)
    got = client.completions.create(model="llama", prompt=[ids, ids[:3]], max_tokens=5, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].text == pipe(ids, max_new_tokens=5, temperature=0)[0].text
    assert got.usage.prompt_tokens == len(ids) + 3
    echoed = client.completions.create(model="llama", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + got.choices[0].text


def test_chat_uses_the_tokenizer_template(client, pipe):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    want = pipe(list(ids), max_new_tokens=10, temperature=0)[0]
    got = client.chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == want.generated_length


def test_streaming_equals_non_streaming(client):
    args = dict(model="llama", prompt=PROMPT, max_tokens=16, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 16
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="llama", messages=messages, max_tokens=16, temperature=0)
    streamed = client.chat.completions.create(model="llama", messages=messages, max_tokens=16, temperature=0,
                                              stream=True)
    pieces = [c.choices[0] for c in streamed if c.choices]
    assert "".join(p.delta.content or "" for p in pieces) == whole.choices[0].message.content
    assert pieces[-1].finish_reason == whole.choices[0].finish_reason


def test_streamed_choices_of_several_prompts_equal_non_streamed(client):
    args = {"model": "llama", "prompt": ["The quick", "Hello"], "max_tokens": 5, "n": 2, "seed": 1,
            "temperature": 1.0, "echo": True}
    whole = [c.text for c in client.completions.create(**args).choices]
    streamed = [""] * 4
    for chunk in client.completions.create(**args, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == whole
    assert whole[0].startswith("The quick") and whole[2].startswith("Hello")


def test_sse_wire_format_ends_with_done(server):
    reply = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True})
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [e for e in reply.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_n_choices_with_seeds_are_reproducible(client):
    args = dict(model="llama", prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=7)
    first = [c.text for c in client.completions.create(**args).choices]
    again = [c.text for c in client.completions.create(**args).choices]
    other = [c.text for c in client.completions.create(**{**args, "seed": 8}).choices]
    assert len(first) == 2 and first == again
    assert first[0] != first[1]  # choice i samples with seed + i
    assert other[0] == first[1]  # seed 8's first choice is seed 7's second
    chat = dict(model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=6, n=2, seed=3)
    assert ([c.message.content for c in client.chat.completions.create(**chat).choices]
            == [c.message.content for c in client.chat.completions.create(**chat).choices])


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="llama", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = next(ch for ch in full[len(full) // 2:] if ch.isprintable() and ch != "\ufffd")
    got = client.completions.create(model="llama", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].text == full[:full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_logprobs_per_token(client):
    got = client.completions.create(model="llama", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == got.choices[0].text
    chat = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3


def test_streamed_logprobs_cover_every_token(client):
    """Tokens whose text is held back (part of a UTF-8 character, a possible stop string) still
    arrive with their log-probabilities when a stream asks for them."""
    kwargs = dict(model="llama", prompt="naïve café 東京 😀", max_tokens=24, temperature=0, logprobs=1)
    full = client.completions.create(**kwargs).choices[0]
    streamed = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    token_logprobs = [v for c in streamed if c.logprobs for v in c.logprobs.token_logprobs]
    assert token_logprobs == full.logprobs.token_logprobs
    assert "".join(c.text for c in streamed) == full.text


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", 5), ("n", 0), ("top_p", 2)])
def test_invalid_field_is_400_naming_it(client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llama", prompt=PROMPT, **{field: value})
    assert err.value.status_code == 400
    assert err.value.body["param"] == field and field in err.value.body["message"]


def test_min_tokens_above_max_tokens_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llama", prompt=PROMPT, max_tokens=2, extra_body={"min_tokens": 5})
    assert err.value.body["param"] == "min_tokens"


def test_prompt_plus_max_tokens_past_model_length_is_400(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llama", prompt=PROMPT, max_tokens=server.engine.max_model_len)
    assert err.value.body["code"] == "context_length_exceeded"
    assert err.value.body["param"] == "max_tokens"


def test_out_of_vocabulary_token_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llama", prompt=[1, 10**6], max_tokens=2)
    assert "vocabulary" in err.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"


def test_api_key_guards_v1_only(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = _post(server, "/v1/completions", {"prompt": PROMPT}, key=None)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_malformed_json_is_400(server):
    reply = _post(server, "/v1/completions", b'{"prompt": "hi", ')
    assert reply.status_code == 400
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_body_over_the_limit_is_413(server):
    reply = _post(server, "/v1/completions", {"prompt": "x" * (MAX_BODY + 1)})
    assert reply.status_code == 413
    chunked = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                         content=iter([b"{" + b" " * MAX_BODY, b"}"]))  # no Content-Length: counted as read
    assert chunked.status_code == 413


def test_max_waiting_counts_only_what_cannot_be_admitted(client, server):
    """With free slots and KV a request is admitted even when no request may wait; the 429 of a
    real backlog is tested in tests/reliability/test_burst.py."""
    server.engine.max_waiting = 0
    try:
        assert client.completions.create(model="llama", prompt=PROMPT, max_tokens=2).choices
    finally:
        server.engine.max_waiting = 1024


def test_engine_failure_fails_only_that_request(client, server, fail_once):
    fail_once(server.engine.engine.model, "forward", "injected failure")
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="llama", prompt=PROMPT, max_tokens=4)
    assert "injected failure" in err.value.body["message"]
    assert client.completions.create(model="llama", prompt=PROMPT, max_tokens=4).choices[0].text
    wait_idle(server.url)


# ---- health, metrics, disconnects, load ------------------------------------------------------
def test_health_reports_engine_stats(server):
    stats = wait_idle(server.url)
    assert stats["status"] == "ok"
    assert stats["kv_blocks_total"] == 512 == stats["kv_blocks_free"]


def test_metrics_expose_splitfuse_series(client, server):
    client.completions.create(model="llama", prompt=PROMPT, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("splitfuse_requests_running", "splitfuse_requests_waiting", "splitfuse_kv_blocks_used",
                 "splitfuse_kv_blocks_total", "splitfuse_time_to_first_token_seconds_bucket",
                 "splitfuse_inter_token_latency_seconds_bucket", "splitfuse_prompt_tokens_total",
                 "splitfuse_generation_tokens_total"):
        assert name in text, name


def test_abandoned_stream_is_aborted(server):
    wait_idle(server.url)
    steps = server.engine.stats.steps
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    wait_idle(server.url)
    assert server.engine.stats.steps - steps < 300  # stopped long before its 400 tokens


def test_200_concurrent_requests_then_all_blocks_free(server):
    headers = {"Authorization": f"Bearer {KEY}"}

    async def one(http: httpx.AsyncClient, i: int) -> str:
        kind = i % 4
        if kind == 0:
            reply = await http.post("/v1/completions", json={"prompt": f"{PROMPT} {i}", "max_tokens": 4})
            return "done" if reply.status_code == 200 and reply.json()["choices"][0]["text"] is not None else "bad"
        if kind == 3:
            reply = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4})
            return "done" if reply.status_code == 200 else "bad"
        body = {"prompt": f"{PROMPT} {i}", "stream": True, "max_tokens": 6 if kind == 1 else 200,
                "ignore_eos": True}
        async with http.stream("POST", "/v1/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if kind == 2 and line.startswith("data: {"):
                    return "cancelled"  # close mid-stream: the server must abort the request
                if line == "data: [DONE]":
                    return "done"
        return "bad"

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=60) as http:
            return await asyncio.gather(*(one(http, i) for i in range(200)))

    results = asyncio.run(run())
    assert results.count("bad") == 0
    assert results.count("cancelled") == 50 and results.count("done") == 150
    stats = wait_idle(server.url)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert server.engine.engine.blocks.num_free == server.engine.engine.blocks.num_blocks
    reply = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert reply.status_code == 200
