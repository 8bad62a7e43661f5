"""Streaming client for any OpenAI-compatible server: one request's token timeline as the client sees it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from splitfuse.bench.metrics import RequestRecord
from splitfuse.bench.workloads import BenchRequest


def _chunk_tokens(choice: dict) -> int:
    """Tokens carried by one streamed choice: its token ids (vLLM's return_token_ids), its logprobs'
    tokens, else one per chunk that carries text."""
    if isinstance(choice.get("token_ids"), list):
        return len(choice["token_ids"])
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1 if choice.get("text") else 0


@dataclass(frozen=True)
class RequestSettings:
    """What each request asks of the server besides prompt, max_tokens and streaming; a field left
    None or False is not sent, so the server's own default applies."""

    temperature: float | None = None
    top_p: float | None = None
    ignore_eos: bool = False
    min_tokens: bool = False  # send min_tokens = max_tokens, so every request generates its full length
    extra_body: dict = field(default_factory=dict)  # any other fields, sent as given (they win)

    def fields(self, gen_len: int) -> dict:
        sent = {"temperature": self.temperature, "top_p": self.top_p}
        sent = {k: v for k, v in sent.items() if v is not None}
        if self.ignore_eos:
            sent["ignore_eos"] = True
        if self.min_tokens:
            sent["min_tokens"] = gen_len
        return {**sent, **self.extra_body}


# FastGen's setting: every request greedy and exactly its length (splitfuse's own server, the HF baselines)
FIXED_LENGTH_GREEDY = RequestSettings(temperature=0.0, ignore_eos=True, min_tokens=True)


class OpenAIClient:
    """Streams `/v1/completions` with `settings` (default: greedy, max_tokens = min_tokens = the
    request's length, ignore_eos); each token is timed at its chunk's arrival, and tokens only the
    final usage reports at the last chunk's."""

    def __init__(self, base_url: str, model: str | None, name: str, send_ids: bool, api_key: str | None = None,
                 timeout_s: float = 600.0, transport: httpx.AsyncBaseTransport | None = None,
                 settings: RequestSettings = FIXED_LENGTH_GREEDY) -> None:
        self.settings = settings
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model = model
        self.name = name
        self.send_ids = send_ids
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.transport = transport
        self._client: httpx.AsyncClient | None = None

    async def model_info(self) -> dict:
        """The served model's entry in /v1/models (the first one when no name was given)."""
        async with httpx.AsyncClient(headers=self.headers, timeout=30, transport=self.transport) as client:
            reply = await client.get(self.base_url + "/models")
            reply.raise_for_status()
            models = reply.json().get("data", [])
        if not models:
            raise RuntimeError(f"{self.base_url}/models lists no model")
        if self.model is None:
            return models[0]
        return next((m for m in models if m.get("id") == self.model), {"id": self.model})

    async def start(self) -> None:
        if self.model is None:
            self.model = (await self.model_info())["id"]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = httpx.AsyncClient(headers=self.headers, limits=limits, transport=self.transport,
                                         timeout=httpx.Timeout(self.timeout_s, connect=30))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def set_concurrency(self, clients: int) -> None:
        """A server batches by itself; nothing to tell it."""

    def body(self, request: BenchRequest, prompt: str | list[int]) -> dict:
        return {
            "model": self.model, "prompt": prompt, "max_tokens": request.gen_len, "stream": True,
            "stream_options": {"include_usage": True}, **self.settings.fields(request.gen_len),
        }

    async def send(self, request: BenchRequest) -> RequestRecord:
        """Send one request and record when each token arrived; failures are recorded, not raised."""
        text = request.prompt_text
        prompt = request.prompt_ids if self.send_ids or text is None else text
        record = RequestRecord(prompt_tokens=len(request.prompt_ids), start=time.perf_counter())
        usage, last = None, None
        try:
            async with self._client.stream("POST", self.base_url + "/completions",
                                           json=self.body(request, prompt)) as reply:
                if reply.status_code != 200:
                    text = (await reply.aread()).decode(errors="replace")[:300]
                    record.error = f"HTTP {reply.status_code}: {text}"
                    record.status = reply.status_code
                    return record
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        record.error = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                        return record
                    for choice in chunk.get("choices") or []:
                        record.token_times.extend([now] * _chunk_tokens(choice))
                        last = now
                    usage = chunk.get("usage") or usage
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:300]
            return record
        if usage:
            record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
            missing = (usage.get("completion_tokens") or 0) - len(record.token_times)
            if missing > 0 and last is not None:
                record.token_times.extend([last] * missing)
                record.tokens_from_usage = missing
        if not record.token_times:
            record.error = "the stream ended without a token"
        return record
