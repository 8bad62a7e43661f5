"""Tool calls on /v1/chat/completions: `tools` and `tool_choice` to a constraint, and the model's
reply back to OpenAI `tool_calls`, whole or as streamed deltas.

With tool_choice "required" the reply is constrained to a JSON array of {"name", "arguments"};
with a named function, to that function's arguments. With "auto" the reply is parsed in the
formats model families use: Hermes/Qwen `<tool_call>{...}</tool_call>` and Llama 3's bare JSON
`{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`, several joined by ";").
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from splitfuse.config import StructuredOutputsParams
from splitfuse.serving.structured import ConstraintRequestError, check

_HERMES_OPEN = "<tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_PYTHON_TAG = "<|python_tag|>"
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools mean for generation: the template's tools, the mode ("auto",
    "required" or a function's name), and the constraint it puts on the output."""

    tools: list[dict]
    mode: str
    constraint: StructuredOutputsParams | None

    @property
    def named(self) -> str | None:
        return None if self.mode in ("auto", "required") else self.mode


def tool_plan(tools: list[dict] | None, tool_choice, parallel_tool_calls: bool = True) -> ToolPlan | None:
    """The plan of a request's tools, or None when it has none or tool_choice is "none";
    ConstraintRequestError names the field that is wrong."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise ConstraintRequestError("tool_choice", "is set but the request gives no tools")
    if not tools or tool_choice == "none":
        return None
    functions = {}
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict) or not function.get("name"):
            raise ConstraintRequestError(f"tools[{index}]", "expected {'type': 'function', 'function': {'name': ...}}")
        functions[function["name"]] = function.get("parameters") or _EMPTY_PARAMETERS
    choice = tool_choice if tool_choice is not None else "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in functions:
            raise ConstraintRequestError("tool_choice", f"names function {name!r}, which is not among the tools "
                                                        f"{sorted(functions)}")
        constraint = StructuredOutputsParams(json=functions[name])
        mode = name
    elif choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                  "required": ["name", "arguments"]} for name, parameters in functions.items()]
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not parallel_tool_calls:
            schema["maxItems"] = 1
        constraint, mode = StructuredOutputsParams(json=schema), "required"
    elif choice == "auto":
        constraint, mode = None, "auto"
    else:
        named = "{'type': 'function', 'function': {'name': ...}}"
        raise ConstraintRequestError("tool_choice", f"expected 'none', 'auto', 'required' or {named}, got {choice!r}")
    if constraint is not None:
        check(constraint, "tools")
    return ToolPlan(list(tools), mode, constraint)


def new_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _call_of(item) -> dict | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    return new_call(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of an unconstrained reply; no calls when none parse."""
    if _HERMES_OPEN in text:
        calls = []
        for body in _HERMES.findall(text):
            try:
                call = _call_of(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = text[:text.index(_HERMES_OPEN)].strip()
        return content or None, calls
    stripped = text.strip().removeprefix(_PYTHON_TAG).strip()
    if stripped.startswith("{"):
        calls = []
        for part in _json_objects(stripped):
            call = _call_of(part)
            if call is None:
                return text, []
            calls.append(call)
        return (None, calls) if calls else (text, [])
    return text, []


def _json_objects(text: str) -> list:
    """The JSON values of text, one or several joined by ";" ([] when it is not that)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return []
        values.append(value)
        rest = text[at:].lstrip()
        if rest and not rest.startswith(";"):
            return []
        at = len(text) - len(rest.removeprefix(";").lstrip())
    return values


def constrained_calls(plan: ToolPlan, text: str) -> list[dict]:
    """The tool calls of a reply generated under the plan's constraint; [] if cut short."""
    if plan.named is not None:
        return [new_call(plan.named, text)] if _is_json(text) else []
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    calls = [_call_of(item) for item in items]
    return calls if all(calls) else []


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def reply(plan: ToolPlan, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
    """(content, tool_calls, finish_reason) of a whole reply."""
    if plan.mode == "auto":
        content, calls = parse_tool_calls(text)
    else:
        calls = constrained_calls(plan, text)
        content = None if calls else text
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return content, calls, finish_reason


class ToolStream:
    """One choice's streamed reply as OpenAI deltas: content streams until a tool call starts; a
    named function's arguments stream as they come; other calls come whole at the end."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.num_sent = 0  # characters of text sent as content (auto) or arguments (named)
        self.calling = False  # auto: a tool call has started, so nothing more streams as content
        self.call_id = new_call("", "")["id"]

    def feed(self, new_text: str) -> list[dict]:
        """Deltas (dicts of ChatDelta fields) to send for new text."""
        self.text += new_text
        if self.plan.named is not None:
            return self._named_delta()
        if self.plan.mode != "auto":
            return []
        upto = self._content_end()
        if upto <= self.num_sent:
            return []
        content, self.num_sent = self.text[self.num_sent:upto], upto
        return [{"content": content}]

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The last deltas and the finish reason, once the reply is complete."""
        if self.plan.named is not None:
            deltas = self._named_delta()
            done = _is_json(self.text)
            return deltas, "tool_calls" if done and finish_reason == "stop" else finish_reason
        content, calls, finish_reason = reply(self.plan, self.text, finish_reason)
        if not calls:
            rest = self.text[self.num_sent:]
            return ([{"content": rest}] if rest else []), finish_reason
        deltas = [{"tool_calls": [{"index": index, **call}]} for index, call in enumerate(calls)]
        return deltas, finish_reason

    def _named_delta(self) -> list[dict]:
        first = self.num_sent == 0 and not self.calling
        arguments, self.num_sent = self.text[self.num_sent:], len(self.text)
        if not first and not arguments:
            return []
        self.calling = True
        call = {"index": 0, "function": {"arguments": arguments}}
        if first:
            call.update(id=self.call_id, type="function")
            call["function"]["name"] = self.plan.named
        return [{"tool_calls": [call]}]

    def _content_end(self) -> int:
        """How much of the text may stream as content now (auto)."""
        if self.calling:
            return self.num_sent
        start = self.text.find(_HERMES_OPEN)
        head = self.text.lstrip()
        if start >= 0 or head.startswith(("{", _PYTHON_TAG)):
            self.calling = True
            return start if start >= 0 else self.num_sent
        if not head or _PYTHON_TAG.startswith(head):
            return self.num_sent  # the reply may still open with a Llama 3 call
        for keep in range(min(len(_HERMES_OPEN) - 1, len(self.text)), 0, -1):
            if _HERMES_OPEN.startswith(self.text[-keep:]):  # maybe the start of "<tool_call>"
                return len(self.text) - keep
        return len(self.text)
