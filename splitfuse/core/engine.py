"""Engine: requests in, one SplitFuse step at a time, token and text deltas out."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core.batch import BlockTables, build_batch
from splitfuse.core.constraints import Constraints
from splitfuse.core.detokenizer import IncrementalDetokenizer
from splitfuse.core.kv_blocks import BlockManager
from splitfuse.core.logprobs import (
    PromptRows,
    first_output_prompt_logprobs,
    prompt_rows,
    record_prompt_logprobs,
    token_logprobs,
)
from splitfuse.core.request import RequestOutput, Sequence, TokenLogprob
from splitfuse.core.sampler import SamplingBatch
from splitfuse.core.scheduler import Scheduler, StepPlan


class AdmissionError(ValueError):
    """A request that can never be served with this engine's limits; in a group, `index` and
    `request_id` say which one."""

    def __init__(self, reason: str, index: int | None = None, request_id: str | None = None) -> None:
        self.reason, self.index, self.request_id = reason, index, request_id
        where = "" if index is None else f"request {index}" + (f" ({request_id!r})" if request_id else "") + ": "
        super().__init__(where + reason)

    def __reduce__(self):  # keep the fields across a process boundary (replicas)
        return type(self), (self.reason, self.index, self.request_id)


class StepError(RuntimeError):
    """A step failed for the requests `request_ids` (now aborted); `outputs` are those of the
    requests of the same step that went on."""

    def __init__(self, request_ids: list[str], cause: BaseException,
                 outputs: list[RequestOutput] | None = None) -> None:
        self.request_ids = list(request_ids)
        self.outputs = list(outputs or [])
        super().__init__(f"{type(cause).__name__}: {cause}")


@dataclass(frozen=True)
class EngineSettings:
    """What an engine was built with once every `None`/`auto` was resolved."""

    block_size: int
    num_kv_blocks: int
    max_model_len: int
    dtype: str  # "float32", "bfloat16", ...
    backend: str  # the backend's own description (name, device)
    quantization: str | None = None  # the weights' quantization in effect ("int4", "gptq int4 (group 128)", ...)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's queues and KV cache; all zero for an engine not yet seen."""

    running: int = 0  # requests holding KV blocks
    waiting: int = 0  # requests queued for admission (preempted ones included)
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    preemptions: int = 0  # since start
    steps: int = 0  # step() calls since start
    prompt_tokens_cached: int = 0  # prompt tokens served from the prefix cache, since start
    prompt_tokens_computed: int = 0  # prompt tokens run through the model at admission, since start
    kv_blocks_cached: int = 0  # blocks holding a reusable prefix (in use or evictable)


Request = tuple[list[int], SamplingParams, str | None]  # (prompt_ids, params, request_id or None)


class Engine:
    """Drives a model on a backend; the caller owns the loop (`while engine.has_unfinished(): step()`)."""

    def __init__(self, model, backend, tokenizer, config: EngineConfig, eos_token_ids: list[int],
                 max_model_len: int, num_kv_blocks: int, block_size: int,
                 sampling_defaults: dict | None = None, parallel=None) -> None:
        self.model = model
        # The TensorParallelGroup of a sharded model (None: one process): it gets every step's
        # metadata before this process, rank 0, runs its own shard.
        self.parallel = parallel
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        # The model's generation_config.json sampling values, for front ends to start from.
        self.sampling_defaults = dict(sampling_defaults or {})
        # A model whose K/V at a position depend on more than the tokens before it (Phi-3's longrope
        # recomputes everything past a length) cannot share blocks by token hash.
        recompute_at = model.recompute_kv_at_length()
        self.blocks = BlockManager(num_kv_blocks, block_size,
                                   enable_caching=config.enable_prefix_caching and recompute_at is None)
        self.kv_cache = backend.allocate_kv_cache(
            model.num_layers, num_kv_blocks, block_size, model.num_kv_heads, model.head_dim, model.dtype
        )
        backend.warm_up(model, self.kv_cache, config, max_model_len, block_size)
        self.scheduler = Scheduler(config.token_budget, config.max_seqs, self.blocks, recompute_at)
        self.settings = EngineSettings(block_size, num_kv_blocks, max_model_len,
                                       str(model.dtype).removeprefix("torch."), backend.describe(),
                                       getattr(model, "quantization", None))
        self.requests: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._num_steps = 0
        self._in_step: list[Sequence] = []  # the sequences of the step now running
        self._block_tables = BlockTables()  # rows grow with the sequences, step to step
        self.constraints = Constraints(tokenizer, model.vocab_size, eos_token_ids,  # structured outputs
                                       overlap=torch.device(backend.device).type != "cpu")

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises AdmissionError if it can never be served."""
        prompt_ids = [int(t) for t in prompt_ids]
        self._check_admissible(prompt_ids, params)
        return self._queue(prompt_ids, params, request_id)

    def add_requests(self, requests: Iterable[Request]) -> list[str]:
        """Queue a group of (prompt_ids, params, request_id or None) all or none: if one cannot be
        admitted, none is queued and the AdmissionError names it (index, id) and says why."""
        checked: list[Request] = []
        seen: set[str] = set()
        for index, (prompt_ids, params, request_id) in enumerate(requests):
            prompt_ids = [int(t) for t in prompt_ids]
            try:
                if request_id is not None and (request_id in self.requests or request_id in seen):
                    raise AdmissionError(f"request_id {request_id!r} is already in use")
                self._check_admissible(prompt_ids, params)
            except AdmissionError as exc:
                raise AdmissionError(exc.reason, index, request_id) from None
            if request_id is not None:
                seen.add(request_id)
            checked.append((prompt_ids, params, request_id))
        added: list[str] = []
        try:
            for prompt_ids, params, request_id in checked:
                added.append(self._queue(prompt_ids, params, request_id))
        except BaseException:
            for request_id in added:
                self.abort(request_id)
            raise
        return added

    def _queue(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None) -> str:
        """Queue an admissible request (prompt_ids already ints and checked)."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seq = Sequence(
            request_id=request_id, prompt_ids=prompt_ids, params=params, arrival=next(self._arrivals),
            max_len=min(self.max_model_len, len(prompt_ids) + params.max_new_tokens),
        )
        seq.stop_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        if params.structured_outputs is not None and not seq.stop_token_ids:
            seq.stop_token_ids = self.eos_token_ids  # a grammar ends the output: its end must stop it
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _check_admissible(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise AdmissionError("prompt is empty: give at least one token")
        if params.prompt_logprobs is not None and self.parallel is not None:
            # the worker ranks run lm_head on the sampled rows only
            raise AdmissionError("prompt_logprobs is not supported with tensor_parallel_size > 1 yet")
        vocab = self.model.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise AdmissionError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise AdmissionError(f"prompt has {len(prompt_ids)} tokens but max_model_len is {self.max_model_len}: "
                                 + self._too_long_advice())
        longest = min(self.max_model_len, len(prompt_ids) + params.max_new_tokens)
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if longest > capacity:
            raise AdmissionError(
                f"prompt + max_new_tokens needs {longest} tokens of KV cache but it holds {capacity}: "
                "lower max_new_tokens or give the cache more blocks (num_kv_blocks / kv_cache_gib)"
            )
        try:
            self.constraints.check(params)
        except ValueError as exc:
            raise AdmissionError(str(exc)) from None

    def _too_long_advice(self) -> str:
        """What can be done about a prompt that does not fit: raising max_model_len only helps below
        the model's own position limit."""
        limit = getattr(self.model, "position_limit", self.max_model_len)
        shorten = f"shorten the prompt to at most {self.max_model_len - 1} tokens (keep its end, say)"
        if self.max_model_len < limit:
            return f"{shorten}, or raise max_model_len (up to the model's limit of {limit})"
        return f"{shorten}; this model reads at most {limit} positions, so a longer max_model_len cannot help"

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is unknown or already done."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.finish_reason = "abort"
        return True

    def abort_all(self) -> list[str]:
        """Abort every unfinished request; returns their ids."""
        request_ids = list(self.requests)
        for request_id in request_ids:
            self.abort(request_id)
        return request_ids

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any; the engine cannot step afterwards."""
        if self.parallel is not None:
            self.parallel.close()

    # ---- state -----------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission (preempted ones included)."""
        return len(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        blocks = self.blocks
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_blocks_used=blocks.num_used, kv_blocks_free=blocks.num_free, kv_blocks_total=blocks.num_blocks,
            preemptions=self.scheduler.num_preemptions, steps=self._num_steps,
            prompt_tokens_cached=self.scheduler.num_cached_prompt_tokens,
            prompt_tokens_computed=self.scheduler.num_computed_prompt_tokens, kv_blocks_cached=blocks.num_cached,
        )

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass. If it raises, the requests in it (whose state it may have left half
        updated) are aborted and StepError names them; the engine goes on serving the others."""
        self._num_steps += 1
        self._in_step = []
        try:
            return self._step()
        except StepError:
            raise  # the failing sequences are isolated and aborted already
        except Exception as exc:
            failed = [seq.request_id for seq in self._in_step or self.scheduler.running]
            for request_id in failed:
                self.abort(request_id)
            if self.parallel is not None:  # the ranks may be mid-step, out of step with this one
                self.parallel.abandon(exc)
            raise StepError(failed, exc) from exc
        finally:
            self._in_step = []

    def _step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        self._in_step = [item.sequence for item in plan.items]
        if not plan:
            return []
        done, failed = self._forward_isolating(plan)
        outputs = [out for part, tokens, logprobs in done for out in self._apply(part, tokens, logprobs)]
        if failed:
            for seq, _ in failed:
                self.abort(seq.request_id)
            raise StepError([seq.request_id for seq, _ in failed], failed[0][1], outputs) from failed[0][1]
        return outputs

    def _forward_isolating(self, plan: StepPlan):
        """([(part, tokens, logprobs)], [(sequence, error)]): when the forward raises, halves of the
        batch run again until each failing sequence is alone (bisection), so one bad request fails
        alone. A rerun writes the same K/V at the same positions, so the others' tokens do not change."""
        # Draw counters advance before a pass can still fail: restored, so a rerun draws the same
        # samples (scored prompt positions are skipped on a rerun by prompt_rows itself).
        draws = [item.sequence.num_draws for item in plan.items]
        try:
            tokens, logprobs = self._forward(plan, [item.sequence for item in plan.items if item.samples])
            return [(plan, tokens, logprobs)], []
        except Exception as exc:
            if self.parallel is not None:
                raise  # the ranks may be out of step: no rerun is safe
            for item, num_draws in zip(plan.items, draws):
                item.sequence.num_draws = num_draws
            if len(plan.items) == 1:
                return [], [(plan.items[0].sequence, exc)]
        half = len(plan.items) // 2
        done, failed = [], []
        for items in (plan.items[:half], plan.items[half:]):
            part_done, part_failed = self._forward_isolating(StepPlan(plan.step, items))
            done += part_done
            failed += part_failed
        return done, failed

    def _apply(self, plan: StepPlan, tokens: list[int], logprobs) -> list[RequestOutput]:
        results = self.scheduler.apply(plan, tokens)
        self.constraints.advance(results)
        outputs = []
        for result, logprob in zip(results, logprobs):
            seq = result.sequence
            if logprob is not None:
                seq.logprobs.append(logprob)
            if result.finish_reason is not None:
                del self.requests[seq.request_id]
            outputs.append(RequestOutput(
                request_id=seq.request_id, new_token_ids=[result.token], new_text=result.text,
                finished=result.finish_reason is not None, finish_reason=result.finish_reason,
                new_logprobs=[logprob] if logprob is not None else [], num_cached_tokens=seq.num_cached_tokens or 0,
                prompt_logprobs=first_output_prompt_logprobs(seq),
            ))
        return outputs

    def _forward(self, plan: StepPlan, sampled: list[Sequence]):
        host_meta = build_batch(plan, self.blocks.block_size, self._block_tables)
        if self.parallel is not None:
            self.parallel.broadcast_step(host_meta)
        meta = self.backend.prepare_batch(host_meta)
        self.constraints.begin(sampled)  # the grammars' CPU work runs beside the forward pass
        hidden = self.backend.forward(self.model, meta, self.kv_cache)
        logits = self._logits(hidden, meta.sample_index, prompt_rows(plan))
        batch = self._sampling_batch(sampled)
        tokens = self.backend.sample(self.constraints.mask(logits, batch), batch)
        for seq in sampled:
            seq.num_draws += 1
        logprobs = self._logprobs(logits, tokens, sampled, batch.num_logprobs)
        return tokens.tolist(), logprobs

    def _logits(self, hidden: torch.Tensor, sample_index: torch.Tensor, scored: PromptRows | None) -> torch.Tensor:
        """Logits [S', V] of the sampled rows; prompt rows that requests score share the lm_head call."""
        if scored is None:
            # every row sampled (a decode-only step): sample_index is 0..T-1, so no gather copy
            rows = hidden if sample_index.numel() == hidden.shape[0] else hidden[sample_index]
            return self.model.logits(rows).float()
        rows = torch.cat([sample_index, torch.tensor(scored.rows, dtype=sample_index.dtype).to(sample_index.device)])
        logits = self.model.logits(hidden[rows]).float()
        num_sampled = sample_index.numel()
        record_prompt_logprobs(scored, logits[num_sampled:])
        return logits[:num_sampled]

    def _sampling_batch(self, sampled: list[Sequence]) -> SamplingBatch:
        suppressed = []
        for seq in sampled:
            early = seq.num_generated < seq.params.min_new_tokens
            suppressed.append(sorted(seq.stop_token_ids) if early else [])
        return SamplingBatch(
            temperatures=[s.params.temperature for s in sampled],
            top_ks=[s.params.top_k for s in sampled],
            top_ps=[s.params.top_p for s in sampled],
            seeds=[s.seed for s in sampled],
            counters=[s.num_draws for s in sampled],
            suppressed=suppressed,
            num_logprobs=max((s.params.logprobs for s in sampled if s.params.logprobs is not None), default=-1),
        )

    def _logprobs(self, logits, tokens, sampled, num_top) -> list[TokenLogprob | None]:
        if num_top < 0:
            return [None] * len(sampled)
        return token_logprobs(logits, tokens.tolist(), [seq.params.logprobs for seq in sampled])
