"""What the command line prints: validation errors in terms of flags, and generation results as
text (with a log-probability table) or as JSON lines."""

from __future__ import annotations

import json

from pydantic import BaseModel, ValidationError

# pydantic's constraint error types and how a user reads them
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}


def _show(value) -> str:
    """A value as the user typed it: -1 rather than -1.0, strings quoted."""
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def flag_of(name: str, models: tuple[type[BaseModel], ...]) -> str:
    """The --flag the user typed for a settings field (the field name itself if none matches)."""
    from splitfuse.cli import field_flag

    for model in models:
        info = model.model_fields.get(name)
        if info is not None:
            return field_flag(name, info)
    return name


def describe_validation_error(exc: ValidationError, models: tuple[type[BaseModel], ...]) -> str:
    """One line per problem, naming the flag: `--temperature must be >= 0 (got -1)`."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc") or ()
        where = flag_of(str(loc[0]), models) if loc else None
        kind, ctx, got = error.get("type", ""), error.get("ctx") or {}, error.get("input")
        if kind in _BOUNDS:
            symbol, key = _BOUNDS[kind]
            problem = f"must be {symbol} {_show(ctx.get(key))} (got {_show(got)})"
        elif kind == "literal_error":
            problem = f"must be one of {ctx.get('expected')} (got {_show(got)})"
        elif kind == "extra_forbidden":
            problem = "is not a known setting"
        else:
            # a validator's own message already says what was expected
            problem = str(error.get("msg", "")).removeprefix("Value error, ")
        if loc and problem.startswith(f"{loc[0]}="):  # "quantization='nf4' is ..." reads "--quantization 'nf4' is ..."
            problem = problem[len(str(loc[0])) + 1:]
        lines.append(f"{where} {problem}" if where else problem)
    return "; ".join(lines)


def format_logprobs(tokenizer, logprobs) -> str:
    """A table of each generated token, its log-probability and the most likely alternatives."""
    def show(token_id: int) -> str:
        return repr(tokenizer.decode([token_id])) if tokenizer is not None else str(token_id)

    rows = ["token logprobs (token, logprob, top alternatives):"]
    for entry in logprobs:
        top = ", ".join(f"{show(t)} {lp:.3f}" for t, lp in sorted(entry.top.items(), key=lambda kv: -kv[1]))
        rows.append(f"  {show(entry.token_id):<16} {entry.logprob:>9.4f}   {top}")
    return "\n".join(rows)


def response_json(prompt, response, tokenizer) -> str:
    """One JSON line per prompt: the text, the token ids and (when asked) the log-probabilities."""
    def text(token_id: int) -> str | None:
        return tokenizer.decode([token_id]) if tokenizer is not None else None

    record = {"prompt": prompt, "text": response.text, "token_ids": response.token_ids,
              "prompt_length": response.prompt_length, "finish_reason": response.finish_reason,
              "num_cached_tokens": response.num_cached_tokens}
    if response.logprobs is not None:
        record["logprobs"] = [
            {"token_id": e.token_id, "token": text(e.token_id), "logprob": e.logprob,
             "top": [{"token_id": t, "token": text(t), "logprob": lp}
                     for t, lp in sorted(e.top.items(), key=lambda kv: -kv[1])]}
            for e in response.logprobs]
    return json.dumps(record, ensure_ascii=False)
