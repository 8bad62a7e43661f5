"""One request as the engine tracks it: its tokens, how many are in the KV cache, its state."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any

from splitfuse.config import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # admitted, holds KV blocks
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Log-probability of a generated token and of the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """What one engine step produced for one request: new tokens and newly released text."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens the request found in the prefix cache
    # With SamplingParams.prompt_logprobs, on the request's first output: one entry per prompt
    # token, None for the first (nothing precedes it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(eq=False)
class Sequence:
    """token_ids holds prompt + generated tokens; the first num_computed of them have K/V cached.

    After preemption num_computed drops to 0 and the sequence is recomputed from token_ids, so
    nothing it generated is lost; seed and num_draws stay, so its random stream continues."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    max_len: int  # generation stops at this many tokens in all (max_model_len)
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1, 2, ... scored so far
    last_scheduled_step: int = -1
    seed: int | None = None  # sampled requests: the request's seed, else a random one; greedy: None
    num_draws: int = 0  # tokens sampled so far: the counter of the next draw from seed's stream
    detokenizer: Any = None
    stop_token_ids: frozenset[int] = frozenset()
    # Prefix caching: hashes of token_ids' full blocks (a chain, extended as tokens come), how
    # many of the held blocks are registered in the cache, and how many prompt tokens the first
    # admission found cached (None until admitted).
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_registered_blocks: int = 0
    num_cached_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        if self.params.is_greedy:
            self.seed = None
        elif self.seed is None:
            # an unseeded request gets its seed now, so every backend replays the same stream
            self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model; 1 for a sequence that is decoding."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int) -> tuple[str, str | None]:
        """Append a sampled token; returns (text it releases, finish reason or None).

        A stop token ends the sequence and stays in token_ids (as HF generate keeps it) but adds
        no text; sampling masks stop tokens until min_new_tokens."""
        self.token_ids.append(token)
        if token in self.stop_token_ids:
            reason, text = "stop", ""
        else:
            detok = self.detokenizer
            if detok is None:  # token ids only: nothing to decode
                return "", "length" if len(self.token_ids) >= self.max_len else None
            text = detok.add(token)
            if detok.stop_hit is not None:
                return text, "stop"
            reason = "length" if len(self.token_ids) >= self.max_len else None
        if reason is not None and self.detokenizer is not None:
            text += self.detokenizer.flush()  # release text held back in case a stop string followed
        return text, reason
