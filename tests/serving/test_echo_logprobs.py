"""/v1/completions with echo and logprobs: the prompt's tokens scored as OpenAI's legacy completions
did (what lm-eval's local-completions reads), and max_tokens 0 to score a prompt without generating."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

import splitfuse

TOL = 1e-4


def ids_of(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, 512) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(model_dir):
    # small budget and blocks: prompts are split over steps, and the prefix cache is on
    handle = splitfuse.serve(model_dir, backend="cpu", token_budget=8, kv_block_size=4, num_kv_blocks=256,
                             served_model_name="llama")
    yield handle
    handle.terminate()


def complete(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": "llama", "temperature": 0, **body}, timeout=60)


def hf_token_logprobs(hf_model, model_dir, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = hf_model(model_dir)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logprobs[:-1].gather(1, torch.tensor(ids[1:]).view(-1, 1)).squeeze(1).tolist()


def test_echo_with_generation_scores_the_prompt_then_the_new_tokens(server, model_dir, hf_model):
    ids = ids_of(21, 1)
    reply = complete(server, prompt=ids, max_tokens=3, echo=True, logprobs=2)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 24
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:21] == pytest.approx(hf_token_logprobs(hf_model, model_dir, ids), abs=TOL)
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lp["top_logprobs"][1:])
    # the generated part is what the same request without echo returns
    plain = complete(server, prompt=ids, max_tokens=3, logprobs=2).json()["choices"][0]
    assert lp["token_logprobs"][21:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=TOL)
    assert choice["text"].endswith(plain["text"])
    echo = choice["text"][:len(choice["text"]) - len(plain["text"])]
    assert lp["text_offset"][0] == 0 and lp["text_offset"][21] == len(echo)
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_max_tokens_zero_scores_the_prompt_only(server, model_dir, hf_model):
    ids = ids_of(13, 2)
    reply = complete(server, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == 13
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 13
    assert lp["token_logprobs"][1:] == pytest.approx(hf_token_logprobs(hf_model, model_dir, ids), abs=TOL)
    assert choice["text"] == complete(server, prompt=ids, max_tokens=1, echo=True).json()["choices"][0]["text"][
        :len(choice["text"])]


def test_max_tokens_zero_without_echo_is_400(server):
    reply = complete(server, prompt=[5, 6, 7], max_tokens=0)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "max_tokens" and "echo" in reply.json()["error"]["message"]


def test_a_batch_of_prompts_each_scored_as_lm_eval_sends_them(server, model_dir, hf_model):
    prompts = [ids_of(n, 10 + n) for n in (9, 17, 4)]
    reply = complete(server, prompt=prompts, max_tokens=1, echo=True, logprobs=1, seed=1234)
    choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
    for ids, choice in zip(prompts, choices, strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert len(token_logprobs) == len(ids) + 1
        assert token_logprobs[1:len(ids)] == pytest.approx(hf_token_logprobs(hf_model, model_dir, ids), abs=TOL)


def test_prefix_cached_prompts_are_scored_in_full(server, model_dir, hf_model):
    ids = ids_of(30, 3)
    complete(server, prompt=ids + [9], max_tokens=1)  # puts the prompt's blocks in the cache
    reply = complete(server, prompt=ids, max_tokens=0, echo=True, logprobs=0).json()
    lp = reply["choices"][0]["logprobs"]
    assert lp["token_logprobs"][1:] == pytest.approx(hf_token_logprobs(hf_model, model_dir, ids), abs=TOL)
    assert all(top == {} for top in lp["top_logprobs"][1:])


def test_streamed_echo_carries_the_same_logprobs(server):
    ids = ids_of(15, 4)
    body = dict(prompt=ids, max_tokens=4, echo=True, logprobs=1)
    full = complete(server, **body).json()["choices"][0]
    streamed = {"text": "", "token_logprobs": [], "finish_reason": None}
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "llama", "temperature": 0, "stream": True, **body}) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                streamed["text"] += choice["text"]
                streamed["token_logprobs"] += (choice["logprobs"] or {}).get("token_logprobs", [])
                streamed["finish_reason"] = choice["finish_reason"] or streamed["finish_reason"]
    assert streamed["text"] == full["text"]
    assert streamed["token_logprobs"] == pytest.approx(full["logprobs"]["token_logprobs"], abs=TOL)
    assert streamed["finish_reason"] == full["finish_reason"]


def test_streamed_max_tokens_zero_sends_the_prompt_only(server):
    ids = ids_of(7, 5)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": "llama", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True}) as reply:
        chunks = [json.loads(line[6:]) for line in reply.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert sum(len((c["logprobs"] or {}).get("tokens", [])) for c in choices) == 7
    assert choices[-1]["finish_reason"] == "length" and choices[-1]["text"] == ""
