"""Weight tables: each architecture expects exactly the weights a real checkpoint of it holds, and a
checkpoint missing one (or holding an unknown one) is refused with that weight's name."""

from __future__ import annotations

import pathlib
import shutil

import pytest
from safetensors.torch import load_file, save_file
from test_moe_models import VARIANTS as MOE_VARIANTS
from test_phi_falcon_opt_gemma2 import VARIANTS as LAYER_NORM_VARIANTS
from test_qwen3_phi3 import LONGROPE
from test_qwen3_phi3 import VARIANTS as QWEN3_PHI3_VARIANTS

from splitfuse.backends.cpu import CpuBackend
from splitfuse.models import load_model

# every layout whose tables differ: conditions on tied embeddings, biases, norms, experts, ...
VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
    "phi-qk": ("phi", {"qk_layernorm": True, "tie_word_embeddings": True}),
    "opt-untied-no-bias": ("opt", {"enable_bias": False, "tie_word_embeddings": False}),
    **MOE_VARIANTS, **QWEN3_PHI3_VARIANTS, **LAYER_NORM_VARIANTS,
}


def load(path):
    return load_model(path, CpuBackend(), dtype="float32").model


def checkpoint_names(path) -> set[str]:
    return {name for f in pathlib.Path(path).glob("*.safetensors") for name in load_file(f)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_expected_weights_are_the_checkpoints_weights(name, model_dir):
    path = model_dir(name)
    model = load(path)
    from_checkpoint = {model.map_weight_name(n)[0] for n in checkpoint_names(path)} - {None}
    assert from_checkpoint == model.expected_weights()
    assert set(model.weights) == model.expected_weights()


def without(path, tmp_path, checkpoint_name: str):
    """A copy of the model directory at `path` whose checkpoint lacks `checkpoint_name`."""
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    tensors = load_file(copy / "model.safetensors")
    del tensors[checkpoint_name]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("name, removed, ours", [
    ("llama", "model.layers.1.self_attn.o_proj.weight", "layers.1.o.weight"),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias", "layers.0.qkv.bias"),  # one part of a fused matrix
    ("llama", "lm_head.weight", "lm_head.weight"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w3.weight", "layers.1.experts.gate_up"),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight", "layers.0.shared.gate.weight"),
    ("opt", "model.decoder.layers.0.fc2.bias", "layers.0.down.bias"),
])
def test_a_missing_weight_is_named(name, removed, ours, model_dir, tmp_path):
    path = without(model_dir(name), tmp_path, removed)
    with pytest.raises(ValueError, match="checkpoint is missing weights") as error:
        load(path)
    assert ours in str(error.value)


def test_the_error_names_the_checkpoint_weight_too(model_dir, tmp_path):
    path = without(model_dir("llama"), tmp_path, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ValueError, match=r"layers\.1\.down\.weight \(from model\.layers\.1\.mlp\.down_proj\.weight\)"):
        load(path)


def test_an_unknown_weight_is_named(model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir("llama"), copy)
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = tensors["model.norm.weight"].clone()
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.self_attn.o_proj.bias'"):
        load(copy)


def test_longrope_asks_for_recompute_past_the_original_context(model_dir):
    assert load(model_dir("phi3-longrope")).recompute_kv_at_length() == LONGROPE["original_max_position_embeddings"] + 1
    assert load(model_dir("phi3")).recompute_kv_at_length() is None
    assert load(model_dir("llama")).recompute_kv_at_length() is None
