"""HF transformers baselines in the benchmark's process: static `generate` batches and transformers'
own continuous batching, each timing every token as it is produced."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import torch

from splitfuse.bench.metrics import RequestRecord
from splitfuse.bench.workloads import BenchRequest

_MODELS: dict[tuple, torch.nn.Module] = {}


def load_hf_model(model_dir: str, device: str, dtype: str):
    """The HF model (eval, sdpa attention), loaded once per process for both baselines."""
    from transformers import AutoModelForCausalLM

    key = (str(model_dir), device, dtype)
    if key not in _MODELS:
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa")
        _MODELS[key] = model.to(device).eval()
    return _MODELS[key]


def continuous_batching_missing() -> str | None:
    """Why transformers' continuous batching cannot run here, or None when it can."""
    import transformers
    from transformers import GenerationMixin

    if not hasattr(GenerationMixin, "init_continuous_batching"):
        return f"transformers {transformers.__version__} has no continuous batching (init_continuous_batching)"
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching import (
            ContinuousBatchingManager,
        )
    except ImportError as exc:
        return f"transformers {transformers.__version__}: continuous batching without the API used here ({exc})"
    if not hasattr(ContinuousBatchingManager, "register_result_handler"):
        return (f"transformers {transformers.__version__}: continuous batching has no register_result_handler "
                "to stream results to the event loop")
    return None


class _StepClock:
    """A stopping criterion that never stops: it records when each generation step's token exists."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)  # the token exists on the device only now
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class _Pending:
    request: BenchRequest
    record: RequestRecord
    done: asyncio.Future


class HFStatic:
    """`generate` in static batches of the requests waiting when a batch starts, left padded, greedy,
    every row run to the batch's longest generation; row tokens are timed at the steps that made them."""

    name = "hf"

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32", max_batch: int = 32) -> None:
        self.model_dir, self.device, self.dtype = model_dir, device, dtype
        self.max_batch = max_batch
        self.batch_size = 1
        self._queue: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.model = await asyncio.to_thread(load_hf_model, self.model_dir, self.device, self.dtype)
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            self.pad_id = 0  # masked out by the attention mask; any id will do
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._batcher())

    def set_concurrency(self, clients: int) -> None:
        self.batch_size = max(1, min(clients, self.max_batch))

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(prompt_tokens=len(request.prompt_ids), start=time.perf_counter())
        pending = _Pending(request, record, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wake.set()
        await pending.done
        return record

    async def _batcher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Clients woken by the previous batch re-send within a few loop turns: let them all join.
            size = -1
            while size != len(self._queue) and len(self._queue) < self.batch_size:
                size = len(self._queue)
                for _ in range(3):
                    await asyncio.sleep(0)
            while self._queue:
                batch, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
                try:
                    times = await asyncio.to_thread(self._generate, [p.request for p in batch])
                    for p in batch:
                        p.record.token_times = times[:p.request.gen_len]
                except Exception as exc:  # noqa: BLE001 - recorded per request; the benchmark goes on
                    for p in batch:
                        p.record.error = f"{type(exc).__name__}: {exc}"[:300]
                for p in batch:
                    if not p.done.done():
                        p.done.set_result(None)

    def _generate(self, requests: list[BenchRequest]) -> list[float]:
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        steps = max(r.gen_len for r in requests)
        clock = _StepClock()
        from transformers import StoppingCriteriaList

        with torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=steps,
                min_new_tokens=steps, do_sample=False, pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([clock]))
        if len(clock.times) < steps:
            raise RuntimeError(f"generate stopped after {len(clock.times)} of {steps} steps")
        return clock.times

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


class HFContinuous:
    """transformers' continuous batching (`init_continuous_batching`): requests streamed through its
    manager; a token's time is when its output reaches the event loop, as a client would see it."""

    name = "hf_cb"

    def __init__(self, model_dir: str, device: str, dtype: str, max_batch_tokens: int, max_context: int,
                 max_clients: int) -> None:
        self.model_dir, self.device, self.dtype = model_dir, device, dtype
        self.max_batch_tokens = max_batch_tokens
        self.max_context, self.max_clients = max_context, max_clients
        self._ids = 0

    async def start(self) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model = await asyncio.to_thread(load_hf_model, self.model_dir, self.device, self.dtype)
        page = 64
        # Sized from the workload: left to itself on a CPU it sizes from RAM and takes tens of seconds.
        # Fewer blocks than requests in flight only make its scheduler queue some of them.
        blocks = math.ceil(self.max_context / page) * min(self.max_clients, 64) + 4
        config = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=self.max_batch_tokens)
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=self.max_context)
        self.manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=config)
        self.manager.start()

    def set_concurrency(self, clients: int) -> None:
        """It batches by itself."""

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(prompt_tokens=len(request.prompt_ids), start=time.perf_counter())
        done = asyncio.get_running_loop().create_future()
        self._ids += 1
        rid = f"bench-{self._ids}"

        def on_output(out) -> None:
            new = len(out.generated_tokens) - len(record.token_times)
            record.token_times.extend([time.perf_counter()] * max(new, 0))
            if out.is_finished() and not done.done():
                if out.error:
                    record.error = str(out.error)[:300]
                done.set_result(None)

        self.manager.register_result_handler(rid, on_output)
        added = self.manager.add_request(list(request.prompt_ids), request_id=rid, max_new_tokens=request.gen_len,
                                         streaming=True, eos_token_id=-1)
        if added is None:
            record.error = "transformers' continuous batching manager refused the request"
            return record
        await done
        return record

    async def close(self) -> None:
        manager = getattr(self, "manager", None)
        if manager is not None:
            await asyncio.to_thread(manager.stop, True)
            self.model.destroy_cached_continuous_batching_manager()
