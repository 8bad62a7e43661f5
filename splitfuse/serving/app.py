"""The OpenAI-compatible FastAPI app: routes, request-to-engine mapping, OpenAI error JSON."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitfuse.config import SamplingParams, resolve_sampling
from splitfuse.core.request import TokenLogprob
from splitfuse.serving.bridge import (
    EngineClosed,
    EngineError,
    EngineFront,
    EngineStopped,
    QueueFull,
    ReplicaLost,
    Replayed,
    RequestGroup,
)
from splitfuse.serving.disconnect import unless_disconnected
from splitfuse.serving.errors import GroupTooLarge
from splitfuse.serving.guard import Guard
from splitfuse.serving.internal_errors import InternalErrors
from splitfuse.serving.metrics import Metrics, Tracker
from splitfuse.serving.structured import ConstraintRequestError, request_constraint
from splitfuse.serving.tools import ToolPlan, ToolStream, reply, tool_plan
from splitfuse.serving.tokenize_async import PromptTooLong, Tokenizing
from splitfuse.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatDelta,
    ChatLogprobs,
    ChatRequest,
    ChatResponse,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    TopLogprob,
    error_body,
)

# The browser playground's page, script and styles (package data).
_STATIC = Path(__file__).parent / "static"

# nginx's status for a client that closed its connection first; nobody reads the reply.
CLIENT_CLOSED = 499

# Seconds a client told 429 waits before retrying: about how long a few requests take to finish.
RETRY_AFTER_S = "1"

# SamplingParams names back to the OpenAI names a client sent, for 400s that name the field.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class APIError(Exception):
    """An error to answer with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


def _sse(payload) -> str:
    data = payload.model_dump_json(exclude_none=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


class _Handlers:
    """Route bodies; one instance per app holds the engine, tokenizer and metrics."""

    def __init__(self, engine: EngineFront, model_name: str, tokenizer, chat_template: str | None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.metrics = Metrics(engine)
        self.tokenizing = Tokenizing(tokenizer, engine.max_model_len)
        self.created = int(time.time())

    # ---- request to engine -----------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")

    async def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
            try:
                return await self.tokenizing.encode(prompt)
            except PromptTooLong as exc:
                raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        return list(prompt)

    def budget(self, prompt_ids: list[int], max_tokens: int | None, param: str) -> int:
        """max_tokens to ask for; 400 when the prompt plus it exceed the model's length."""
        limit = self.engine.max_model_len
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(prompt_ids) >= limit:  # no room for even one completion token
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt alone has "
                           f"{len(prompt_ids)}; shorten the prompt to at most {limit - 1} tokens",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - len(prompt_ids)
        if len(prompt_ids) + max_tokens > limit or max_tokens < 1:
            raise APIError(
                400, f"this model's maximum context length is {limit} tokens, but you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                "completion); reduce the prompt or max_tokens", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def params(self, req: SamplingFields, max_tokens: int, logprobs: int | None, choice: int,
               prompt_logprobs: int | None = None, constraint=None) -> SamplingParams:
        if req.min_tokens > max_tokens:  # checked here so the 400 names the client's field
            raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                           param="min_tokens")
        request = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_new_tokens=max_tokens,
                       min_new_tokens=req.min_tokens, ignore_eos=req.ignore_eos, stop=req.stop, logprobs=logprobs,
                       prompt_logprobs=prompt_logprobs,
                       # Each of the n choices gets its own seed, so seeded choices differ yet are reproducible.
                       seed=None if req.seed is None else req.seed + choice, structured_outputs=constraint)
        try:
            return resolve_sampling(self.engine.sampling_defaults, None, request)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else None
            param = _OPENAI_NAMES.get(name, name)
            raise APIError(400, f"{param or 'request'}: {err['msg']}", param=param) from None

    @staticmethod
    def constraint(req: SamplingFields, tools: ToolPlan | None = None):
        """The request's output constraint (response_format, guided_*, or its tools); 400 naming
        the field when it is invalid or there are two."""
        try:
            constraint = request_constraint(req)
        except ConstraintRequestError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        if tools is not None and tools.constraint is not None:
            if constraint is not None:
                raise APIError(400, "tool_choice: a required or named tool call cannot be combined with "
                                    "response_format or guided_* fields", param="tool_choice")
            return tools.constraint
        return constraint

    async def submit(self, requests: list[tuple[list[int], SamplingParams]], param: str) -> RequestGroup:
        try:
            group = await self.engine.submit(requests)
        except QueueFull as exc:
            raise APIError(429, str(exc), "rate_limit_error", None, "queue_full",
                           headers={"Retry-After": RETRY_AFTER_S}) from None
        except GroupTooLarge as exc:
            raise APIError(400, str(exc), param="n", code="too_many_choices") from None
        except EngineStopped as exc:
            raise APIError(503, str(exc), "server_error", None, "unavailable") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param=param) from None
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in requests))
        return group

    async def collect(self, group: RequestGroup, tracker: Tracker, num: int) -> list[list]:
        """All outputs of a group, per choice; an engine failure becomes a 500."""
        outputs: list[list] = [[] for _ in range(num)]
        group.replayable = True  # nothing reaches the client before the end: a replica's death is survivable
        try:
            async for index, out in group:
                if out is Replayed:  # the choice starts over on another replica
                    outputs[index].clear()
                    tracker.replay(index)
                    continue
                tracker.token(index, out)
                outputs[index].append(out)
        except (ReplicaLost, EngineClosed) as exc:
            raise APIError(503, str(exc), "server_error", None, "unavailable") from None
        except EngineError as exc:
            raise APIError(500, str(exc), "server_error", None, "engine_error") from None
        finally:
            group.abort()
        return outputs

    # ---- logprobs formatting ---------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for lp in lps:
            text = self.token_text(lp.token_id)
            result.tokens.append(text)
            result.token_logprobs.append(lp.logprob)
            result.top_logprobs.append({self.token_text(t): v for t, v in lp.top.items()})
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def echo_logprobs(self, prompt_ids: list[int], entries: list[TokenLogprob | None]) -> CompletionLogprobs:
        """The echoed prompt's tokens as OpenAI gave them: the first one has no log-probability."""
        first = self.token_text(prompt_ids[0])
        head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
        return head.extend(self.completion_logprobs(entries[1:], len(first)))

    def chat_logprobs(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        def entry(token_id: int, value: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return ChatLogprobs(content=[
            ChatTokenLogprob(**entry(lp.token_id, lp.logprob),
                             top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top.items()])
            for lp in lps
        ])

    # ---- /v1/completions -------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request):
        self.check_model(req.model)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        score_only = req.max_tokens == 0
        if score_only and not req.echo:
            raise APIError(400, "max_tokens 0 generates nothing: it is only allowed with echo true, to score the "
                           "prompt (give logprobs too)", param="max_tokens")
        # echo with logprobs: the prompt tokens' log-probabilities too (OpenAI's legacy completions)
        prompt_logprobs = req.logprobs if req.echo else None
        encoded = [await self.encode(p) for p in prompts]
        constraint = self.constraint(req)
        requests, echoes = [], []
        for prompt, ids in zip(prompts, encoded):
            # max_tokens 0: the step that ends the prompt samples a token anyway; it is dropped
            max_tokens = self.budget(ids, 1 if score_only else req.max_tokens, "prompt")
            echo = (prompt if isinstance(prompt, str) else await self.tokenizing.decode(ids)) if req.echo else ""
            for choice in range(req.n):
                requests.append((ids, self.params(req, max_tokens, req.logprobs, choice, prompt_logprobs,
                                                  constraint)))
                echoes.append(echo)
        tracker = self.metrics.tracker([len(ids) for ids in encoded], req.n)
        group = await self.submit(requests, "prompt")
        if score_only:
            group = _PromptOnly(group)
        if req.stream:
            return self._stream(self._completion_chunks(group, tracker, req, echoes, [ids for ids, _ in requests]))
        outputs = await unless_disconnected(raw, self.collect(group, tracker, len(requests)))
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED)
        choices = []
        for index, outs in enumerate(outputs):
            text = echoes[index] + "".join(o.new_text for o in outs)
            lps = None
            if req.logprobs is not None:
                lps = self.completion_logprobs([lp for o in outs for lp in o.new_logprobs], len(echoes[index]))
                if req.echo:
                    lps = self.echo_logprobs(requests[index][0], outs[0].prompt_logprobs).extend(lps)
            choices.append(CompletionChoice(index=index, text=text, finish_reason=outs[-1].finish_reason, logprobs=lps))
        return CompletionResponse(model=self.model_name, choices=choices, usage=tracker.usage())

    async def _completion_chunks(self, group, tracker, req, echoes, prompt_ids) -> AsyncIterator[str]:
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        offsets = [len(e) for e in echoes]
        # with logprobs, a choice's echo waits for its first output, which brings the prompt's log-probabilities
        echo_first = req.logprobs is None
        for index, echo in enumerate(echoes):
            if echo and echo_first:
                yield _sse(CompletionChunk(**head, choices=[CompletionChoice(index=index, text=echo)]))
        try:
            async for index, out in group:
                tracker.token(index, out)
                if req.echo and not echo_first and out.prompt_logprobs is not None:
                    yield _sse(CompletionChunk(**head, choices=[CompletionChoice(
                        index=index, text=echoes[index],
                        logprobs=self.echo_logprobs(prompt_ids[index], out.prompt_logprobs))]))
                if not out.new_text and not out.finished and req.logprobs is None:
                    continue  # a token whose text is still held back; with logprobs it is still sent
                lps = None
                if req.logprobs is not None:
                    lps = self.completion_logprobs(out.new_logprobs, offsets[index])
                offsets[index] += len(out.new_text)
                yield _sse(CompletionChunk(**head, choices=[CompletionChoice(
                    index=index, text=out.new_text, logprobs=lps, finish_reason=out.finish_reason)]))
        finally:
            group.abort()
        if _include_usage(req):
            yield _sse(CompletionChunk(**head, choices=[], usage=tracker.usage()))

    # ---- /v1/chat/completions --------------------------------------------------------------
    async def chat(self, req: ChatRequest, raw: Request):
        self.check_model(req.model)
        messages = [m.template_fields() for m in req.messages]
        try:
            tools = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)
        except ConstraintRequestError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        constraint = self.constraint(req, tools)
        try:
            ids = await self.tokenizing.encode_chat(messages, self.chat_template, tools.tools if tools else None)
        except PromptTooLong as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        max_tokens = self.budget(ids, req.max_completion_tokens or req.max_tokens, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        requests = [(ids, self.params(req, max_tokens, top, choice, constraint=constraint)) for choice in range(req.n)]
        tracker = self.metrics.tracker([len(ids)], req.n)
        group = await self.submit(requests, "messages")
        if req.stream:
            return self._stream(self._chat_chunks(group, tracker, req, tools))
        outputs = await unless_disconnected(raw, self.collect(group, tracker, len(requests)))
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED)
        choices = []
        for index, outs in enumerate(outputs):
            lps = [lp for o in outs for lp in o.new_logprobs]
            content, calls, finish_reason = "".join(o.new_text for o in outs), None, outs[-1].finish_reason
            if tools is not None:
                content, calls, finish_reason = reply(tools, content, finish_reason)
            choices.append(ChatChoice(
                index=index, message=AssistantMessage(content=content, tool_calls=calls or None),
                finish_reason=finish_reason, logprobs=self.chat_logprobs(lps) if req.logprobs else None))
        return ChatResponse(model=self.model_name, choices=choices, usage=tracker.usage())

    async def _chat_chunks(self, group, tracker, req, tools: ToolPlan | None = None) -> AsyncIterator[str]:
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        # OpenAI opens each choice with a chunk carrying only the role.
        for index in range(req.n):
            yield _sse(ChatChunk(**head, choices=[ChatChunkChoice(index=index, delta=ChatDelta(role="assistant",
                                                                                                 content=""))]))
        streams = [ToolStream(tools) for _ in range(req.n)] if tools is not None else None
        try:
            async for index, out in group:
                tracker.token(index, out)
                finish_reason = out.finish_reason
                if streams is not None:  # tool calls: content and calls as the plan lets them out
                    deltas = streams[index].feed(out.new_text)
                    if out.finished:
                        last, finish_reason = streams[index].finish(out.finish_reason)
                        deltas += last
                    for delta in deltas:
                        yield _sse(ChatChunk(**head, choices=[ChatChunkChoice(index=index, delta=ChatDelta(**delta))]))
                elif out.new_text or (req.logprobs and out.new_logprobs):
                    yield _sse(ChatChunk(**head, choices=[ChatChunkChoice(
                        index=index, delta=ChatDelta(content=out.new_text),
                        logprobs=self.chat_logprobs(out.new_logprobs) if req.logprobs else None)]))
                if out.finished:
                    yield _sse(ChatChunk(**head, choices=[ChatChunkChoice(
                        index=index, delta=ChatDelta(), finish_reason=finish_reason)]))
        finally:
            group.abort()
        if _include_usage(req):
            yield _sse(ChatChunk(**head, choices=[], usage=tracker.usage()))

    def _stream(self, chunks: AsyncIterator[str]) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield chunk
                yield "data: [DONE]\n\n"
            except EngineError as exc:
                # Headers are already sent: report the failure in the stream, as OpenAI does.
                code = "unavailable" if isinstance(exc, (ReplicaLost, EngineClosed)) else "engine_error"
                yield f"data: {json.dumps(error_body(str(exc), 'server_error', None, code))}\n\n"
                yield "data: [DONE]\n\n"  # the stream still ends as every stream does
            finally:
                # Runs when the client disconnects too (the task is cancelled): abort and free KV blocks.
                await chunks.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _PromptOnly:
    """A request group whose one sampled token is dropped: max_tokens 0 scores the prompt only."""

    def __init__(self, group: RequestGroup) -> None:
        self.group = group

    def __aiter__(self):
        return self._outputs()

    async def _outputs(self):
        async for index, out in self.group:
            yield index, dataclasses.replace(out, new_token_ids=[], new_text="", new_logprobs=[],
                                             finish_reason="length" if out.finished else None)

    def abort(self) -> None:
        self.group.abort()

    async def aclose(self) -> None:
        self.group.abort()


def _unparsable_body(cause: BaseException | None) -> tuple[str, str] | None:
    """(message, code) saying why FastAPI could not parse a body as JSON, where it says only that it could not."""
    if isinstance(cause, UnicodeDecodeError):
        return (f"the request body is not valid UTF-8: byte 0x{cause.object[cause.start]:02x} at offset "
                f"{cause.start}; send JSON encoded as UTF-8", "invalid_encoding")
    if isinstance(cause, RecursionError):
        return "the request body's JSON is nested too deeply to parse; flatten it", "invalid_json"
    return None


def _include_usage(req) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


def create_app(engine: EngineFront, model_name: str, tokenizer, api_key: str | None = None,
               chat_template: str | None = None, max_body_bytes: int = 4 * 1024 * 1024,
               allowed_hosts: frozenset[str] | None = None, client_timeout_s: float = 30.0) -> FastAPI:
    """The OpenAI-compatible app over `engine`; /v1/* needs `api_key` when one is set; a Host outside
    `allowed_hosts` (None: any) is refused."""
    handlers = _Handlers(engine, model_name, tokenizer, chat_template)
    app = FastAPI(title="splitfuse", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.handlers = handlers
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # OpenAI answers 400 naming the field where FastAPI would answer 422.
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            where = err.get("loc", ("body", "?"))[-1]
            why = (err.get("ctx") or {}).get("error", err.get("msg"))
            return _error_response(APIError(400, f"malformed JSON body at character {where}: {why}",
                                            code="invalid_json"))
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        message = str(err.get("msg")).removeprefix("Value error, ")  # pydantic's prefix for our own checks
        return _error_response(APIError(400, f"{where}: {message}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message, code = _unparsable_body(exc.__cause__) or (str(exc.detail), None)
        # 405's Allow header (and any other the exception carries) goes to the client.
        return _error_response(APIError(exc.status_code, message, kind, code=code, headers=exc.headers))

    @app.get("/health")
    async def health():
        """200 once ready; with replicas, 200 while at least one lives (each one's state under
        "replicas"), 503 when none does or the server is draining."""
        stats = vars(engine.stats)
        if not engine.ready:
            return JSONResponse({"status": "unavailable", **stats}, status_code=503)
        return {"status": "ok", "model": model_name, **stats}

    @app.get("/metrics")
    async def metrics():
        return Response(handlers.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": handlers.created, "owned_by": "splitfuse",
            "max_model_len": engine.max_model_len,
            # what an unset temperature/top_p/top_k becomes: the model's generation_config.json
            "sampling_defaults": {k: v for k, v in engine.sampling_defaults.items()
                                  if k in ("temperature", "top_p", "top_k")}}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await handlers.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, raw: Request):
        return await handlers.chat(req, raw)

    # The playground holds no secrets, so it is served without the API key; its requests send one.
    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(_STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=_STATIC), name="static")

    # Outermost, so oversized or unauthenticated requests are turned away before parsing.
    app.add_middleware(InternalErrors)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts,
                       client_timeout_s=client_timeout_s)
    return app
