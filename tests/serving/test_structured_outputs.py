"""response_format and vLLM's guided_* / structured_outputs fields through the openai client."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

import splitfuse

SCHEMA = {
    "type": "object",
    "properties": {"level": {"enum": ["low", "high"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
                   "ids": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
    "required": ["level", "n", "ids"],
}


class Answer(BaseModel):
    ok: bool
    grade: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def client(demo_client):
    return demo_client


def chat(client, **kwargs):
    kwargs = {"temperature": 1.0, "max_tokens": 60, **kwargs}
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], **kwargs)


def test_json_schema_response_format_on_chat_validates_for_every_choice(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    response = chat(client, n=6, response_format=response_format)
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_parse_with_a_pydantic_model_returns_a_parsed_object(client):
    completion = client.chat.completions.parse(model="demo", messages=[{"role": "user", "content": "Grade it"}],
                                               response_format=Answer, temperature=1.0, max_tokens=80)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Answer) and 0 <= parsed.grade <= 9


def test_json_object_streams_a_json_object(client):
    stream = chat(client, response_format={"type": "json_object"}, stream=True, seed=1, max_tokens=100)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.startswith("{")
    if finish == ["stop"]:
        assert isinstance(json.loads(text), dict)


def test_vllm_guided_fields_on_completions(client):
    prompts = ["Pick one:", "Now:"]
    picks = client.completions.create(model="demo", prompt=prompts, n=4, temperature=1.0,
                                      extra_body={"guided_choice": ["red", "green", "blue"]})
    assert len(picks.choices) == 8 and all(c.text in ("red", "green", "blue") for c in picks.choices)
    dates = client.completions.create(model="demo", prompt="Date:", n=4, temperature=1.0, max_tokens=20,
                                      extra_body={"guided_regex": r"20\d\d-[01]\d-[0-3]\d"})
    assert all(re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", c.text) for c in dates.choices)
    records = client.completions.create(model="demo", prompt="Record:", n=4, temperature=1.0, max_tokens=60,
                                        extra_body={"guided_json": SCHEMA})
    for choice in records.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    response_format = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
    formatted = client.completions.create(model="demo", prompt="Record:", n=2, temperature=1.0, max_tokens=60,
                                          extra_body={"response_format": response_format})
    for choice in formatted.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    sums = client.completions.create(model="demo", prompt="Sum:", n=2, temperature=1.0, max_tokens=30,
                                     extra_body={"structured_outputs": {"grammar": 'root ::= [0-9] ("+" [0-9])?'}})
    assert all(re.fullmatch(r"\d(\+\d)?", c.text) for c in sums.choices)


@pytest.mark.parametrize("body, param, problem", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format", "Unsupported type"),
    ({"response_format": {"type": "xml"}}, "response_format", "'xml' is not supported"),
    ({"guided_regex": "a(b"}, "guided_regex", "parenthesis is not closed"),
    ({"guided_grammar": "root ::= nothing"}, "guided_grammar", '"nothing" is not defined'),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "give one output constraint"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one of"),
])
def test_an_invalid_constraint_is_a_400_naming_the_field(client, body, param, problem):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, extra_body=body)
    error = caught.value.body
    assert error["param"] == param and problem in error["message"]


def test_constraints_reach_replica_processes():
    # each replica process compiles the constraint it receives in the pickled SamplingParams
    handle = splitfuse.serve(None, backend="cpu", dtype="float32", served_model_name="demo", replicas=2)
    try:
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key="none", max_retries=0, timeout=120)
        picks = client.completions.create(model="demo", prompt=["Pick:", "Choose:"], n=3, temperature=1.0,
                                          extra_body={"guided_choice": ["left", "right"]})
    finally:
        handle.terminate()
    assert len(picks.choices) == 6 and all(c.text in ("left", "right") for c in picks.choices)
