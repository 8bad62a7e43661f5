"""Validated settings: how the engine is shaped (EngineConfig) and how each request samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["int8", "int4", "fp8"]


def is_greedy(temperature: float, top_k: int) -> bool:
    """The one greedy rule: temperature 0 or top_k 1 takes the argmax and draws no noise."""
    return temperature <= 0 or top_k == 1


class EngineConfig(BaseModel):
    """Knobs of one engine instance; names match the pipeline's keyword arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_budget: int = Field(768, ge=1, description="tokens per forward pass (FastGen's default)")
    max_seqs: int = Field(256, ge=1, description="sequences per forward pass")
    kv_block_size: int | None = Field(None, ge=1, description="tokens per KV block; None = backend's choice")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV blocks; None = sized from memory")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size where the device has no free-memory query (cpu)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of device memory to use")
    dtype: DType = "auto"
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of prompt prefixes other requests computed")
    enforce_eager: bool = Field(False, description="run every step op by op: no CUDA graphs for decode steps")
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + generation; None = model's limit")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model directory (config, tokenizer)")
    tensor_parallel_size: int = Field(1, ge=1, description="processes (devices) each layer is split over")
    quantization: Quantization | None = Field(
        None, description="quantize linear-layer weights at load, weight-only: int8 (per channel), int4 (groups of 128) "
                    "or fp8 (float8_e4m3fn, per channel)")
    cpu_threads_bind: str | None = Field(
        None, description="cpu backend: pin OpenMP threads to CPUs: 'auto' (one per CPU this process may use), "
                    "a CPU list such as '0-1' (one thread each), or 'none' (default: threads are not pinned)")

    @field_validator("cpu_threads_bind")
    @classmethod
    def _cpu_list(cls, value):
        from splitfuse.backends.cpu.threads import validate

        return validate(value)

    @field_validator("quantization", mode="before")
    @classmethod
    def _known_quantization(cls, value):
        if value is not None and value not in Quantization.__args__:
            raise ValueError(f"quantization={value!r} is not supported; expected one of "
                             f"{list(Quantization.__args__)} or None")
        return value


class StructuredOutputsParams(BaseModel):
    """One constraint on a request's output (vLLM's names): a JSON schema, any JSON object, a regex,
    one of some strings, or an EBNF grammar. Exactly one is given."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # `json` to callers (vLLM's name); the attribute may not shadow BaseModel.json
    json_schema: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema (dict or text)")
    json_object: bool = Field(False, description="any JSON object")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="an EBNF (GBNF) grammar whose start rule is `root`")

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_of_a_model_class(cls, value):
        # a pydantic model class stands for its JSON schema
        return value.model_json_schema() if isinstance(value, type) and issubclass(value, BaseModel) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputsParams":
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given = [name.replace("json_schema", "json") for name in given] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        return self


class SamplingParams(BaseModel):
    """Per-request generation settings; temperature 0 means greedy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(64, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives to return per token")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="log-probabilities of the prompt's tokens, with this many top alternatives each")
    structured_outputs: StructuredOutputsParams | None = Field(None, description="constrain the output to a grammar")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value):
        if isinstance(value, str):
            return [value]
        return [] if value is None else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _min_not_above_max(self) -> "SamplingParams":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})"
            )
        return self

    @property
    def is_greedy(self) -> bool:
        return is_greedy(self.temperature, self.top_k)


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """Split pipeline keyword arguments into engine and sampling fields; unknown names raise."""
    engine, sampling = {}, {}
    for key, value in kwargs.items():
        if key in EngineConfig.model_fields:
            engine[key] = value
        elif key in SamplingParams.model_fields:
            sampling[key] = value
        else:
            known = sorted(set(EngineConfig.model_fields) | set(SamplingParams.model_fields))
            raise TypeError(f"unknown argument {key!r}; expected one of: {', '.join(known)}")
    return engine, sampling


def resolve_sampling(model_defaults: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None,
                     request: Mapping[str, Any] | None = None) -> SamplingParams:
    """A request's SamplingParams from three layers, each overriding the one before: the model's
    generation_config.json values, the pipeline's or server's defaults, the request's own fields.
    A None value means "not given", so it never hides an earlier layer's value."""
    fields: dict[str, Any] = {}
    for layer in (model_defaults, defaults, request):
        fields.update({name: value for name, value in (layer or {}).items() if value is not None})
    return SamplingParams(**fields)
