"""Tensor parallelism on the CPU with gloo: two ranks give the tokens one rank and HF give, workers
never outlive the engine, and what cannot be split is refused clearly."""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from pydantic import ValidationError

import splitfuse
from splitfuse.cli import build_parser
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core.batch import build_batch
from splitfuse.core.engine import StepError
from splitfuse.core.kv_blocks import BlockManager
from splitfuse.core.request import Sequence
from splitfuse.core.scheduler import Scheduler
from splitfuse.models.loader import ModelLoadError
from splitfuse.parallel.step_meta import pack, unpack
from splitfuse.testing.parity import check_all, hf_greedy
from splitfuse.testing.processes import wait_gone
from splitfuse.testing.tiny_model import make_tiny_model

# 40 blocks of 4 tokens for four 33-54 token prompts decoding 24 tokens each, 32 tokens a step:
# prompts span several steps and decodes outgrow the cache, so a sequence is preempted.
PREEMPTING = dict(token_budget=32, kv_block_size=4, num_kv_blocks=40)
NEW_TOKENS = 24


def _prompts() -> list[list[int]]:
    rng = random.Random(2)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (33, 40, 47, 54)]


def _worker_pids(pipe) -> list[int]:
    return [process.pid for process in pipe.engine.parallel.workers]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_two_ranks_give_the_tokens_of_one_rank_and_hf(name, tiny_model_dir, hf_model):
    prompts = _prompts()
    one = splitfuse.pipeline(tiny_model_dir(name), backend="cpu", **PREEMPTING)
    expected = [r.token_ids for r in one(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)]
    two = check_all(name, {**PREEMPTING, "tensor_parallel_size": 2}, tiny_model_dir, hf_model, None, prompts,
                    new_tokens=NEW_TOKENS)
    try:
        assert two.engine.scheduler.num_preemptions > 0, "the settings should force a preemption"
        again = two(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)  # a second call on the same workers
        assert [r.token_ids for r in again] == expected
    finally:
        two.engine.close()


def test_four_ranks_give_the_tokens_of_one_rank(tiny_model_dir):
    # 4 heads, 2 KV heads, each copied on two ranks; 512 vocabulary rows and 128 intermediate in 4
    prompts = _prompts()
    one = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", **PREEMPTING)
    expected = [r.token_ids for r in one(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)]
    four = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", tensor_parallel_size=4, **PREEMPTING)
    try:
        assert four.engine.model.num_heads == 1 and four.engine.model.num_kv_heads == 1
        assert [r.token_ids for r in four(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)] == expected
        assert four.engine.scheduler.num_preemptions > 0
    finally:
        four.close()
    assert multiprocessing.active_children() == []


def test_fewer_kv_heads_than_ranks_and_an_uneven_vocabulary(tmp_path, hf_model):
    # One KV head is copied to both ranks; 515 vocabulary rows split 258 + 257.
    path = str(make_tiny_model(tmp_path / "m", "llama", num_kv_heads=1, vocab_size=515))
    prompts = _prompts()[:2]
    pipe = splitfuse.pipeline(path, backend="cpu", tensor_parallel_size=2, token_budget=16, kv_block_size=4)
    try:
        assert pipe.engine.model.num_kv_heads == 1 and pipe.engine.model.weights["lm_head.weight"].shape[0] == 258
        responses = pipe(prompts, max_new_tokens=8, temperature=0.0)
        assert [r.token_ids for r in responses] == [hf_greedy(hf_model(path), p, 8) for p in prompts]
    finally:
        pipe.engine.close()


def test_each_rank_loads_only_its_slices(tiny_model_dir):
    from splitfuse.backends.cpu import CpuBackend
    from splitfuse.models.loader import load_model
    from splitfuse.parallel import Shard

    path = tiny_model_dir("llama")  # 4 heads, 2 KV heads of 16, hidden 64, intermediate 128, vocab 512
    whole = load_model(path, CpuBackend()).model.weights
    rank1 = load_model(path, CpuBackend(), shard=Shard(1, 2)).model.weights
    q, kv = slice(32, 64), slice(64 + 16, 64 + 32)  # rank 1's query rows, then its KV head's rows in k
    assert torch.equal(rank1["layers.0.qkv.weight"][:32], whole["layers.0.qkv.weight"][q])
    assert torch.equal(rank1["layers.0.qkv.weight"][32:48], whole["layers.0.qkv.weight"][kv])
    assert torch.equal(rank1["layers.0.o.weight"], whole["layers.0.o.weight"][:, 32:])
    assert torch.equal(rank1["layers.0.down.weight"], whole["layers.0.down.weight"][:, 64:])
    assert torch.equal(rank1["embed_tokens.weight"], whole["embed_tokens.weight"][256:])
    assert torch.equal(rank1["norm.weight"], whole["norm.weight"])


def test_batch_metadata_survives_packing():
    # three prompts in a 12-token step: one whole, one chunked, one not yet started
    scheduler = Scheduler(token_budget=12, max_seqs=8, blocks=BlockManager(32, 4))
    for i, n in enumerate((3, 13, 5)):
        scheduler.add(Sequence(str(i), list(range(1, n + 1)), SamplingParams(), arrival=i, max_len=n + 4))
    meta = build_batch(scheduler.schedule(), 4)
    assert meta.num_seqs == 2 and meta.sample_index.numel() == 1
    back = unpack(*pack(meta))
    for field in ("input_ids", "positions", "query_start", "context_lens", "block_tables", "slot_mapping",
                  "token_seq", "sample_index", "seq_lens"):
        assert torch.equal(getattr(back, field), getattr(meta, field)), field
        assert getattr(back, field).dtype == getattr(meta, field).dtype, field
    for field in ("num_tokens", "num_seqs", "max_query_len", "max_context_len", "block_size", "is_decode_only",
                  "query_start_host", "context_lens_host"):
        assert getattr(back, field) == getattr(meta, field), field


def test_a_killed_worker_fails_the_engine_clearly_and_leaves_no_process(tiny_model_dir):
    pipe = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", tensor_parallel_size=2)
    pids = _worker_pids(pipe)
    os.kill(pids[0], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(StepError, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
        pipe([5, 6, 7], max_new_tokens=4, temperature=0.0)
    assert time.monotonic() - started < 10
    with pytest.raises(StepError, match="cannot run more steps"):  # it stays failed, never hangs
        pipe([5, 6, 7], max_new_tokens=4, temperature=0.0)
    pipe.engine.close()
    assert wait_gone(pids) == [] and multiprocessing.active_children() == []


def test_a_worker_killed_mid_generation_fails_the_step_within_seconds(tiny_model_dir):
    pipe = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", tensor_parallel_size=2, token_budget=4)
    engine, pids = pipe.engine, _worker_pids(pipe)
    engine.add_request(list(range(5, 15)), SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True))
    for _ in range(4):  # the prompt over three steps, then a decode
        engine.step()
    os.kill(pids[0], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(StepError, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
        while engine.has_unfinished():
            engine.step()
    assert time.monotonic() - started < 10
    assert not engine.has_unfinished()  # its request was aborted with the step
    pipe.close()
    assert wait_gone(pids) == [] and multiprocessing.active_children() == []


def test_a_failed_step_stops_the_workers_and_every_later_step_raises(tiny_model_dir, monkeypatch):
    pipe = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", tensor_parallel_size=2)
    pids = _worker_pids(pipe)
    monkeypatch.setattr(pipe.engine.model, "logits", lambda hidden: 1 / 0)  # rank 0 fails after the all-reduces
    with pytest.raises(StepError, match="ZeroDivisionError"):
        pipe([5, 6, 7], max_new_tokens=4, temperature=0.0)
    assert wait_gone(pids) == []
    with pytest.raises(StepError, match="ranks out of step"):
        pipe([5, 6, 7], max_new_tokens=4, temperature=0.0)
    pipe.engine.close()


def test_workers_exit_when_the_engine_is_dropped_or_closed(tiny_model_dir):
    pipe = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", tensor_parallel_size=2)
    pids = _worker_pids(pipe)
    pipe.close()
    del pipe
    gc.collect()
    assert wait_gone(pids) == []
    # the process group was left with the engine: a new tensor-parallel engine can start
    again = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", tensor_parallel_size=2)
    again.engine.close()
    assert multiprocessing.active_children() == []
    with pytest.raises(StepError, match="engine is closed"):
        again([5, 6, 7], max_new_tokens=4, temperature=0.0)


def test_workers_exit_when_the_engine_process_dies(tiny_model_dir):
    script = textwrap.dedent(f"""
        import os, signal, splitfuse
        if __name__ == "__main__":
            pipe = splitfuse.pipeline({tiny_model_dir("llama")!r}, backend="cpu", tensor_parallel_size=2)
            print(pipe.engine.parallel.workers[0].pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert wait_gone([int(out.stdout.split()[0])]) == []


def test_an_architecture_without_tensor_parallel_support_is_refused(tiny_model_dir):
    from transformers import AutoConfig

    from splitfuse.backends.cpu import CpuBackend
    from splitfuse.models.llama import LlamaForCausalLM
    from splitfuse.parallel import Shard

    class UnshardedLlama(LlamaForCausalLM):  # a subclass must declare the support anew
        pass

    model = UnshardedLlama(AutoConfig.from_pretrained(tiny_model_dir("llama")), CpuBackend(), torch.float32, 64)
    with pytest.raises(ValueError, match="tensor_parallel_size=2: UnshardedLlama does not support tensor "
                                         "parallelism"):
        model.set_shard(Shard(1, 2))


def test_a_size_that_does_not_split_the_heads_is_refused(tiny_model_dir):
    with pytest.raises(ModelLoadError, match=r"tensor_parallel_size=3 must divide num_attention_heads \(4\)"):
        splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", tensor_parallel_size=3)
    assert multiprocessing.active_children() == []


def test_tensor_parallel_size_must_be_at_least_one():
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)


def test_the_cli_flag_sets_tensor_parallel_size():
    args = build_parser().parse_args(["generate", "hello", "--tensor-parallel-size", "2"])
    assert args.tensor_parallel_size == 2
    assert build_parser().parse_args(["serve", "-tp", "4"]).tensor_parallel_size == 4


def test_the_process_group_backend_follows_the_accelerator():
    from splitfuse.backends.cpu import CpuBackend
    from splitfuse.backends.cuda.backend import CudaBackend

    assert CpuBackend.distributed_backend() == "gloo"
    # tests run the cuda backend under the Triton interpreter, on CPU tensors: gloo there, nccl on GPUs
    assert CudaBackend.distributed_backend() == ("gloo" if CudaBackend.cpu_mode() else "nccl")


def test_device_ranks_send_host_tensors_over_gloo_beside_the_accelerators_backend():
    from splitfuse.parallel.group import process_group_backend

    class OnDevice:
        device = torch.device("cuda", 1)

        @classmethod
        def distributed_backend(cls) -> str:
            return "nccl"

    # each step's metadata is a host tensor, which nccl cannot carry
    assert process_group_backend(OnDevice()) == "cpu:gloo,cuda:nccl"
    OnDevice.device = torch.device("cpu")  # host tensors only: one backend carries everything
    assert process_group_backend(OnDevice()) == "nccl"


def test_closing_the_pipeline_stops_its_workers(tiny_model_dir):
    pipe = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", tensor_parallel_size=2)
    pids = _worker_pids(pipe)
    pipe.close()
    assert wait_gone(pids) == []

