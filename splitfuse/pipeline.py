"""The non-persistent deployment: `splitfuse.pipeline(model)(prompts)` in this process."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from splitfuse.assembly import build_engine
from splitfuse.config import EngineConfig, SamplingParams, resolve_sampling, split_kwargs
from splitfuse.core.engine import AdmissionError, Engine
from splitfuse.core.request import TokenLogprob

Prompt = str | Sequence[int]


@dataclass
class Response:
    """One finished generation; token_ids holds the generated tokens only."""

    text: str
    token_ids: list[int]
    prompt_length: int
    finish_reason: str  # "stop" | "length"
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)
    # prompt_logprobs=N: per prompt token its log-probability and N top alternatives; None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None
    generated_length: int = field(init=False)

    def __post_init__(self) -> None:
        self.generated_length = len(self.token_ids)

    def __str__(self) -> str:
        return self.text


class Pipeline:
    """Generate for many prompts at once; every call shares one engine and KV cache."""

    def __init__(self, model: str | Path | None = None, backend: str | None = "auto", **kwargs) -> None:
        engine_kwargs, sampling_kwargs = split_kwargs(kwargs)
        self.engine: Engine | None = build_engine(model, backend, EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._defaults = sampling_kwargs
        self._model_defaults = self.engine.sampling_defaults
        self.sampling_params()  # fail now, not at the first call

    def sampling_params(self, **overrides) -> SamplingParams:
        """The model's generation_config.json values, then this pipeline's defaults, then overrides."""
        return resolve_sampling(self._model_defaults, self._defaults, overrides)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: strings through the tokenizer, id lists as given (no BOS added)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer: give prompts as lists of token ids")
            return self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _live_engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("this pipeline is closed")
        return self.engine

    def __call__(self, prompts: Prompt | Sequence[Prompt], **sampling) -> list[Response]:
        """Generate for every prompt; responses come in the order of the prompts."""
        engine = self._live_engine()
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts is empty: give a string, a list of token ids, or a non-empty list of them")
        params = self.sampling_params(**sampling)
        encoded = [self.encode(p) for p in prompts]
        try:
            ids = engine.add_requests([(prompt_ids, params, None) for prompt_ids in encoded])
        except AdmissionError as exc:
            raise AdmissionError(f"prompt {exc.index}: {exc.reason}") from None
        try:
            results = {rid: [] for rid in ids}
            final = {}
            while any(rid not in final for rid in ids):
                for out in engine.step():
                    if out.request_id in results:
                        results[out.request_id].append(out)
                        if out.finished:
                            final[out.request_id] = out.finish_reason
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            raise
        return [self._response(engine, results[rid], len(p), params) for rid, p in zip(ids, encoded)]

    @staticmethod
    def _response(engine: Engine, outputs, prompt_length: int, params: SamplingParams) -> Response:
        token_ids = [t for o in outputs for t in o.new_token_ids]
        logprobs = [lp for o in outputs for lp in o.new_logprobs] if params.logprobs is not None else None
        return Response(
            text="".join(o.new_text for o in outputs), token_ids=token_ids, prompt_length=prompt_length,
            finish_reason=outputs[-1].finish_reason, logprobs=logprobs, num_cached_tokens=outputs[0].num_cached_tokens,
            prompt_logprobs=outputs[0].prompt_logprobs,
        )

    def stream(self, prompt: Prompt, **sampling) -> Generator[str, None, Response]:
        """Yield text as it is generated; leaving the loop early aborts the request. The generator's
        return value (`yield from`, or StopIteration.value) is the finished Response."""
        engine = self._live_engine()
        prompt_ids = self.encode(prompt)
        params = self.sampling_params(**sampling)
        request_id = engine.add_request(prompt_ids, params)
        outputs = []
        finished = False
        try:
            while not finished:
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    outputs.append(out)
                    finished = out.finished
                    if out.new_text:
                        yield out.new_text
        finally:
            if not finished:
                engine.abort(request_id)
        return self._response(engine, outputs, len(prompt_ids), params)

    def close(self) -> None:
        """Free the KV cache and the model and stop tensor-parallel workers; the pipeline cannot be
        used afterwards."""
        if self.engine is not None:
            self.engine.close()
        self.engine = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.engine = None


def pipeline(model: str | Path | None = None, backend: str | None = "auto", **kwargs) -> Pipeline:
    """A Pipeline on `model` (a Hugging Face directory; None = the embedded default)."""
    return Pipeline(model, backend, **kwargs)
