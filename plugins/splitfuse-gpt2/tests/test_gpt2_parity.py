"""GPT-2 on splitfuse against Hugging Face transformers, for the layouts the conformance suite does
not build: GPT-2's own tied head, per-layer score scaling with exact GELU, and the original OpenAI
checkpoint names."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config

import splitfuse
from splitfuse.backends.cpu import CpuBackend
from splitfuse.plugins import get_plugin_manager
from splitfuse.testing import make_tiny_model
from splitfuse.testing.parity import hf_greedy, mismatch
from splitfuse_gpt2.model import GPT2LMHeadModel

# GPT-2's own init (std 0.02, residual projections scaled down) gives a tiny model that says nearly
# the same token whatever it reads; a wider init makes every weight show in the greedy tokens.
SPREAD = dict(initializer_range=0.2)
VARIANTS = {
    "tied-gelu-new": dict(tie_word_embeddings=True, **SPREAD),  # GPT-2 as released
    "inverse-layer-scale-exact-gelu": dict(scale_attn_by_inverse_layer_idx=True, activation_function="gelu", **SPREAD),
}
PROMPT_LENGTHS = (1, 3, 17, 45)
NEW_TOKENS = 6


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENGTHS]


def _check_against_hf(path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # 6-token steps and 4-token KV blocks: prompts are chunked and share steps with decodes
    pipe = splitfuse.pipeline(path, backend="cpu", token_budget=6, kv_block_size=4)
    responses = pipe(_prompts(), max_new_tokens=NEW_TOKENS, temperature=0.0)
    problems = [mismatch(hf, p, r.token_ids, hf_greedy(hf, p, NEW_TOKENS)) for p, r in zip(_prompts(), responses)]
    assert [p for p in problems if p] == []
    assert pipe.engine.blocks.num_free == pipe.engine.blocks.num_blocks
    pipe.close()


def test_registered_through_its_entry_point():
    models = get_plugin_manager().models()
    assert models.get("GPT2LMHeadModel") is GPT2LMHeadModel
    assert models.source("GPT2LMHeadModel").startswith("splitfuse-gpt2 ")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf(variant, tmp_path):
    _check_against_hf(make_tiny_model(tmp_path, "GPT2LMHeadModel", **VARIANTS[variant]))


def test_openai_checkpoint_names_and_mask_buffers(tmp_path):
    """OpenAI's files name weights without "transformer." and carry attn.bias / attn.masked_bias buffers."""
    path = make_tiny_model(tmp_path / "gpt2", "GPT2LMHeadModel", tie_word_embeddings=True, **SPREAD)
    tensors = load_file(path / "model.safetensors")
    renamed = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    for i in range(2):
        renamed[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
        renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    openai = tmp_path / "openai"
    shutil.copytree(path, openai)
    save_file(renamed, openai / "model.safetensors", metadata={"format": "pt"})
    prompts = _prompts()
    expected = splitfuse.pipeline(path, backend="cpu")(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
    got = splitfuse.pipeline(openai, backend="cpu")(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_unsupported_activation_is_refused_by_name():
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=512, activation_function="relu")
    with pytest.raises(ValueError, match="activation_function 'relu' is not supported"):
        GPT2LMHeadModel(config, CpuBackend(), torch.float32, 64)
