"""End to end on the cuda backend: greedy output equals HF transformers token for token.

Llama covers RMSNorm, full rotary and GQA; Phi-2 what Llama does not: the LayerNorm kernel with
its fused residual, partial rotary (half of each head) in the rotary + KV-write kernel, biases
and a parallel attention/MLP block. Without a GPU every kernel runs in the Triton interpreter, so
this stays tiny: 2 layers, hidden 64, prompts of 1, 5 and 11 tokens, 4 new tokens, a token budget
of 8 (the 11-token prompt is chunked and shares steps with decodes) and 4-token KV blocks.
"""

from __future__ import annotations

import random

import pytest

import splitfuse
from splitfuse.testing.parity import hf_greedy, mismatch
from splitfuse.testing.tiny_model import make_tiny_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_greedy_matches_hf(arch, tmp_path_factory, tiny_model_dir, hf_model):
    pytest.importorskip("splitfuse.backends.triton.paged_attention")
    path = tiny_model_dir("llama") if arch == "llama" else str(make_tiny_model(tmp_path_factory.mktemp(arch), arch))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 5, 11)]
    # float32 so HF's fp32 reference is comparable on a GPU too (the default there is bf16)
    pipe = splitfuse.pipeline(path, backend="cuda", kv_block_size=4, token_budget=8, dtype="float32")
    assert pipe.engine.backend.name == "cuda"
    responses = pipe(prompts, max_new_tokens=4, temperature=0.0)
    model = hf_model(path)
    problems = [mismatch(model, p, r.token_ids, hf_greedy(model, p, 4)) for p, r in zip(prompts, responses)]
    assert [p for p in problems if p] == []
    assert all(len(r.token_ids) == 4 for r in responses)
    assert pipe.engine.blocks.num_free == pipe.engine.blocks.num_blocks
