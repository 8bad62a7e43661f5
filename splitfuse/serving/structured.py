"""An OpenAI request's output constraint: `response_format`, or vLLM's `guided_*` fields and
`structured_outputs` object, as one StructuredOutputsParams checked before anything runs."""

from __future__ import annotations

from pydantic import ValidationError

from splitfuse.config import StructuredOutputsParams
from splitfuse.core.constraints import ConstraintError, validate


class ConstraintRequestError(ValueError):
    """A constraint the server cannot accept; `param` is the request field to name in the 400."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _from_response_format(value: dict) -> StructuredOutputsParams | None:
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        if not isinstance(schema, (dict, str)):
            raise ConstraintRequestError("response_format", "json_schema.schema must be a JSON schema object")
        return StructuredOutputsParams(json=schema)
    raise ConstraintRequestError("response_format", f"type {kind!r} is not supported; expected 'text', "
                                                    "'json_object' or 'json_schema'")


def _from_fields(req) -> list[tuple[str, StructuredOutputsParams]]:
    found = []
    if req.response_format is not None:
        spec = _from_response_format(req.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    for field, name in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar")):
        value = getattr(req, field)
        if value is not None:
            found.append((field, StructuredOutputsParams(**{name: value})))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", StructuredOutputsParams(**req.structured_outputs)))
    return found


def request_constraint(req) -> StructuredOutputsParams | None:
    """The request's constraint, compiled once to check it; ConstraintRequestError names the field."""
    try:
        found = _from_fields(req)
    except ValidationError as exc:
        raise ConstraintRequestError("structured_outputs", exc.errors()[0]["msg"]) from None
    if not found:
        return None
    if len(found) > 1:
        raise ConstraintRequestError(found[1][0], f"give one output constraint, not {[p for p, _ in found]}")
    param, spec = found[0]
    check(spec, param)
    return spec


def check(spec: StructuredOutputsParams, param: str) -> None:
    """Raise ConstraintRequestError naming `param` when spec does not compile."""
    try:
        validate(spec)
    except ConstraintError as exc:
        raise ConstraintRequestError(param, exc.reason) from None
