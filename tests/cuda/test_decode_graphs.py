"""Decode steps through static, padded per-bucket buffers (the CUDA-graph path).

Without a GPU the buckets run eagerly under the Triton interpreter: that checks the padding rules
(skipped KV writes, dummy contexts, stale rows cleared, fixed split counts) that the graphs rely
on. With a GPU the graphs themselves are captured and replayed.
"""

from __future__ import annotations

import random

import pytest
import torch

import splitfuse
from splitfuse.config import SamplingParams
from splitfuse.testing.parity import hf_greedy, mismatch


def test_buckets_cover_every_batch_size_up_to_the_largest():
    from splitfuse.backends.cuda.graphs import batch_buckets

    assert batch_buckets(0) == []
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    sizes = batch_buckets(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256
    assert sizes == sorted(set(sizes))
    assert len(sizes) <= 24  # capture time grows with the number of graphs


def _prompts():
    rng = random.Random(3)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 6, 9, 14)]


def _run_engine(engine, prompts, new_tokens):
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=0.0)) for p, n in zip(prompts, new_tokens)]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[i] for i in ids]


@pytest.mark.slow
def test_padded_static_decode_matches_hf(tiny_model_dir, hf_model, device):
    from splitfuse.backends.cuda.graphs import DecodeGraphs

    path = tiny_model_dir("llama")
    # 14 blocks: exactly what the four requests need, so block 0, where padded rows would write
    # if their KV write were not skipped, holds a live sequence's keys
    pipe = splitfuse.pipeline(path, backend="cuda", kv_block_size=4, token_budget=16, num_kv_blocks=14,
                              dtype="float32", enforce_eager=True)
    engine = pipe.engine
    graphs = DecodeGraphs(engine.model, engine.kv_cache, max_batch=4, max_model_len=engine.max_model_len,
                          block_size=engine.blocks.block_size, device=engine.backend.device,
                          use_graphs=device.type == "cuda")
    graphs.capture()
    assert sorted(graphs.buckets) == [1, 2, 4]
    engine.backend._graphs = graphs
    used = []
    run = graphs.run
    graphs.run = lambda meta: used.append((meta.num_seqs, graphs.bucket_for(meta))) or run(meta)

    prompts = _prompts()
    # budget 16: three prompts, then decodes + the 4th prompt; then 4 decodes, then 3 in the same
    # bucket of 4 (a stale row to clear) while the first request, which holds block 0, still
    # decodes; then 2 and 1
    new_tokens = [6, 4, 5, 5]
    ours = _run_engine(engine, prompts, new_tokens)

    model = hf_model(path)
    problems = [mismatch(model, p, o, hf_greedy(model, p, n)) for p, o, n in zip(prompts, ours, new_tokens)]
    assert [p for p in problems if p] == []
    assert (4, 4) in used and (3, 4) in used and (1, 1) in used
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_mixed_and_oversized_steps_run_eagerly(tiny_model_dir):
    from splitfuse.backends.cuda.graphs import DecodeGraphs
    from splitfuse.core.batch import BatchMeta

    graphs = DecodeGraphs(None, [], max_batch=4, max_model_len=64, block_size=4, device=torch.device("cpu"),
                          use_graphs=False)
    graphs.buckets = {1: None, 2: None, 4: None}

    def meta(num_seqs, decode_only):
        empty = torch.empty(0)
        return BatchMeta(empty, empty, empty, empty, empty, empty, empty, empty, num_tokens=num_seqs,
                         num_seqs=num_seqs, max_query_len=1 if decode_only else 7, max_context_len=9,
                         block_size=4, is_decode_only=decode_only)

    assert graphs.bucket_for(meta(3, True)) == 4
    assert graphs.bucket_for(meta(1, True)) == 1
    assert graphs.bucket_for(meta(5, True)) is None  # above the largest bucket
    assert graphs.bucket_for(meta(2, False)) is None  # a prompt chunk in the step
