"""Shared fixtures: tiny random-weight models built once per test session, and HF references."""

from __future__ import annotations

import os

import pytest
import torch

# Keep test runs from picking a backend from the shell.
os.environ.pop("SPLITFUSE_BACKEND", None)
# Without a GPU the cuda backend's Triton kernels run under the interpreter; it must be switched on
# before triton (or any kernel module) is first imported, so here, before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# name -> (arch, overrides): the variants the parity tests cover.
TINY_MODELS = {
    "llama": ("llama", {}),
    # Llama 3 style: llama3 rope scaling and tied embeddings.
    "llama3": ("llama", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    # A window shorter than the prompts, so sliding-window masking is exercised.
    "mistral": ("mistral", {"sliding_window": 24}),
    "qwen2": ("qwen2", {}),
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["SPLITFUSE_CACHE_DIR"] = str(tmp_path_factory.mktemp("splitfuse-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Returns a function name -> directory of that tiny model, built once per session."""
    from splitfuse.testing.tiny_model import tiny_model_builder

    return tiny_model_builder(tmp_path_factory, TINY_MODELS)


@pytest.fixture(scope="session")
def hf_model():
    """Returns a function directory -> HF transformers model (fp32, eval), loaded once."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def get(path: str):
        if path not in loaded:
            loaded[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return loaded[path]

    return get
