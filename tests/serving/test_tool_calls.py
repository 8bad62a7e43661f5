"""Tool calls on /v1/chat/completions: tools reach the chat template, "required" and named
tool_choice constrain the reply to valid arguments, "auto" replies are parsed (Hermes/Qwen and
Llama 3 formats), streamed or not."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from splitfuse.serving.tools import ToolStream, parse_tool_calls, tool_plan

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
# A Hermes-style template: the tools go into a system turn, past calls are written back as <tool_call>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nTools: {% for tool in tools %}{{ tool | tojson }}{% endfor %}</s>\n"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% for call in m.get('tool_calls') or [] %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Weather?"}]


@pytest.fixture(scope="module")
def client(demo_client):
    return demo_client


def create(client, **kwargs):
    kwargs = {"model": "demo", "messages": MESSAGES, "tools": TOOLS, "temperature": 1.0, "max_tokens": 120, **kwargs}
    return client.chat.completions.create(**kwargs)


def assert_valid(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ---- end to end --------------------------------------------------------------------------------
def test_tools_are_rendered_into_the_prompt(client):
    plain = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1)
    with_tools = create(client, max_tokens=1)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_required_tool_choice_returns_valid_calls(client):
    # one call each (parallel_tool_calls=False): a random model would rarely close a longer list
    response = create(client, tool_choice="required", n=4, parallel_tool_calls=False)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid(choice.message.tool_calls)


def test_a_named_function_returns_its_valid_arguments(client):
    response = create(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}, n=4)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert_valid([call])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_call_deltas_assemble_into_valid_calls(client, tool_choice):
    with client.chat.completions.stream(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                        parallel_tool_calls=False, temperature=1.0, max_tokens=120) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert_valid(choice.message.tool_calls)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_a_hermes_tool_call_from_the_reply(client, stream):
    # the regex makes the model write a Hermes call, which "auto" must recognise
    forced = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}</tool_call>'
    kwargs = dict(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice="auto", temperature=1.0, max_tokens=120,
                  extra_body={"guided_regex": forced})
    if stream:
        with client.chat.completions.stream(**kwargs) as events:
            choice = events.get_final_completion().choices[0]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert_valid([call])


def test_auto_without_a_call_is_plain_content(client):
    reply = create(client, tool_choice="auto", max_tokens=30, extra_body={"guided_choice": ["Sunny today."]})
    choice = reply.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == ("Sunny today.", None, "stop")


def test_none_leaves_the_reply_unconstrained_and_unparsed(client):
    choice = create(client, tool_choice="none", max_tokens=4).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs, param, problem", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "sometimes"}, "tool_choice", "expected 'none', 'auto', 'required'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}],
      "tool_choice": "required"}, "tools", "Unsupported type"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "cannot be combined"),
])
def test_bad_tools_are_a_400_naming_the_field(client, kwargs, param, problem):
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, **kwargs)
    assert caught.value.body["param"] == param and problem in caught.value.body["message"]


def test_tool_choice_without_tools_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="no tools"):
        client.chat.completions.create(model="demo", messages=MESSAGES, tool_choice="required")


def test_past_tool_calls_and_results_go_through_the_template(client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    response = create(client, messages=history, max_tokens=2)
    assert response.usage.prompt_tokens > create(client, max_tokens=2).usage.prompt_tokens + 10


# ---- parsing -----------------------------------------------------------------------------------
def test_hermes_calls_are_parsed_with_the_content_before_them():
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Rome", "days": 2}), ("get_time", {"zone": "UTC"})]


def test_llama3_json_calls_are_parsed():
    text = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}; {"name": "get_time", "parameters": {}}'
    content, calls = parse_tool_calls(text)
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [{"zone": "CET"}, {}]


@pytest.mark.parametrize("text", ["plain words", '{"not": "a call"}', "<tool_call>{broken</tool_call>", "{oops"])
def test_text_that_is_not_a_call_stays_content(text):
    assert parse_tool_calls(text) == (text, [])


def test_required_allows_several_calls_unless_parallel_calls_are_off():
    many = tool_plan(TOOLS, "required").constraint.json_schema
    one = tool_plan(TOOLS, "required", parallel_tool_calls=False).constraint.json_schema
    assert (many["minItems"], "maxItems" in many, one["maxItems"]) == (1, False, 1)


def test_auto_stream_sends_content_until_a_call_starts_and_the_call_at_the_end():
    plan = tool_plan(TOOLS, "auto")
    text = 'Hi <tool_ok> there <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    stream = ToolStream(plan)
    deltas = [d for piece in text for d in stream.feed(piece)]
    last, finish_reason = stream.finish("stop")
    assert "".join(d["content"] for d in deltas) == "Hi <tool_ok> there "
    [call] = [c for d in last for c in d["tool_calls"]]
    assert (call["index"], call["function"]["name"], finish_reason) == (0, "get_time", "tool_calls")


def test_auto_stream_without_a_call_sends_all_the_content():
    stream = ToolStream(tool_plan(TOOLS, "auto"))
    deltas = [d for piece in ["{", "x", "}", " <tool"] for d in stream.feed(piece)]
    last, finish_reason = stream.finish("length")
    assert "".join(d["content"] for d in deltas + last) == "{x} <tool" and finish_reason == "length"
