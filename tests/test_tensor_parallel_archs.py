"""Tensor parallelism for every built-in architecture beyond Llama and Qwen2: two ranks give the
greedy tokens of one rank and of HF, with prompts over several steps and a preemption."""

from __future__ import annotations

import multiprocessing
import shutil

import pytest
import torch

import splitfuse
from splitfuse.testing.parity import hf_greedy, mismatch
from splitfuse.testing.tiny_model import tiny_model_builder
from test_tensor_parallel import NEW_TOKENS, PREEMPTING, _prompts

# name -> (arch, config overrides), each with what its sharding must get right
VARIANTS = {
    "qwen3": ("qwen3", {}),  # per-head q/k norms, replicated on every rank
    # sandwich norms after the all-reduces, soft-capped attention and logits (gathered before the
    # cap), a window shorter than the prompts, tied embeddings split by vocabulary
    "gemma2": ("gemma2", {"sliding_window": 24, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 10.0,
                          "final_logit_softcapping": 5.0, "tie_word_embeddings": True}),
    # experts split along their intermediate dimension, router replicated, a sliding window
    "mixtral": ("mixtral", {"sliding_window": 24}),
    # a sparse layer with the shared expert and its sigmoid gate, then a dense layer
    "qwen2_moe": ("qwen2_moe", {"mlp_only_layers": [1]}),
    # q/k/v and gate/up fused in the checkpoint: each rank reads its rows of every part
    "phi3": ("phi3", {}),
    # partial rotary, attention and MLP in parallel (one all-reduce), biases on rank 0 only
    "phi": ("phi", {"qk_layernorm": True}),
    # one KV head (copied on both ranks) after all the query heads in query_key_value, tied lm_head
    "falcon-7b": ("falcon", {"multi_query": True, "parallel_attn": True, "tie_word_embeddings": True}),
    # query_key_value grouped per KV head, with one KV head for two ranks: each reads half its
    # group's queries (with as many KV heads as ranks, whole groups: as falcon-seq below)
    "falcon-40b-1kv": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 1}),
    # query_key_value per head [q, k, v], attention then MLP, biases
    "falcon-seq": ("falcon", {"multi_query": False, "parallel_attn": False, "bias": True}),
    # post-LN, learned positions, biases, embeddings of 32 projected to the hidden 64
    "opt-350m": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32, "tie_word_embeddings": True}),
}


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    return tiny_model_builder(tmp_path_factory, VARIANTS)


def greedy(path: str, **settings) -> tuple[list[list[int]], int]:
    """(greedy tokens of _prompts(), preemptions) of a pipeline built with `settings`, then closed."""
    pipe = splitfuse.pipeline(path, backend="cpu", **PREEMPTING, **settings)
    try:
        tokens = [r.token_ids for r in pipe(_prompts(), max_new_tokens=NEW_TOKENS, temperature=0.0)]
        return tokens, pipe.engine.scheduler.num_preemptions
    finally:
        pipe.close()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_give_the_tokens_of_one_rank_and_hf(name, arch_dir, hf_model):
    path = arch_dir(name)
    one, _ = greedy(path)
    two, preemptions = greedy(path, tensor_parallel_size=2)
    assert preemptions > 0, "the settings should force a preemption"
    assert two == one
    hf = hf_model(path)
    problems = [mismatch(hf, p, tokens, hf_greedy(hf, p, NEW_TOKENS)) for p, tokens in zip(_prompts(), two)]
    assert problems == [None] * len(problems)
    assert multiprocessing.active_children() == []


def test_experts_stacked_in_one_tensor_split_too(arch_dir, hf_model, tmp_path):
    # transformers' in-memory layout: each layer's experts as gate_up [E, 2I, H] and down [E, H, I]
    from safetensors.torch import load_file, save_file

    source = arch_dir("mixtral")
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    tensors = load_file(f"{source}/model.safetensors")
    for i in range(2):
        block = f"model.layers.{i}.block_sparse_moe.experts"
        experts = [{w: tensors.pop(f"{block}.{e}.{w}.weight") for w in ("w1", "w2", "w3")} for e in range(4)]
        tensors[f"{block}.gate_up_proj"] = torch.stack([torch.cat([x["w1"], x["w3"]]) for x in experts])
        tensors[f"{block}.down_proj"] = torch.stack([x["w2"] for x in experts])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    prompt = [5, 6, 7, 8, 9]
    expected = hf_greedy(hf_model(source), prompt, 8)
    for size in (1, 2):
        pipe = splitfuse.pipeline(str(tmp_path), backend="cpu", token_budget=4, kv_block_size=4,
                                  tensor_parallel_size=size)
        try:
            assert pipe([prompt], max_new_tokens=8, temperature=0.0)[0].token_ids == expected, size
        finally:
            pipe.close()
    assert multiprocessing.active_children() == []
