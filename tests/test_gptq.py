"""GPTQ 4-bit checkpoints: a tiny llama packed here from the documented GEMM layout loads into
QuantizedWeights that dequantize exactly to the packer's weights, generates the tokens of the same
model holding those weights as plain float32, and unsupported configurations are refused at load."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import splitfuse
from splitfuse.models.loader import ModelLoadError
from splitfuse.quant import QuantizedWeight
from splitfuse.testing.parity import make_prompts
from splitfuse.testing.tiny_model import make_tiny_model
from test_quantization import _divergence, _greedy

STORED_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _pack_along_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> int32 [R/8, C]: row r in bits 4*(r%8) of packed row r//8."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    v = values.to(torch.int64).view(values.shape[0] // 8, 8, values.shape[1])
    packed = (v << shifts[None, :, None]).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement


def quantize_groups(weight: torch.Tensor, group_size: int, sym: bool = False, min_zero: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit in contiguous groups along K of a float [N, K]: (q [N, K], zero points
    and fp16 scales [N, G], the dequantized float32 [N, K]). sym: GPTQ's symmetric grid (zero 8)."""
    N, K = weight.shape
    groups = weight.float().view(N, K // group_size, group_size)
    low, high = groups.amin(2).clamp_max(0), groups.amax(2).clamp_min(0)
    if sym:
        high = torch.maximum(high, -low)
        low = -high
    scales = ((high - low) / 15).clamp_min(1e-4).half()  # fp16 as stored; the float32 math uses it exactly
    zeros = torch.full_like(low, 8, dtype=torch.int64) if sym else \
        torch.round(-low / scales.float()).clamp(min_zero, 15).to(torch.int64)
    q = (torch.round(groups / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.int64)
    dequantized = ((q - zeros[..., None]).float() * scales.float()[..., None]).view(N, K)
    return q.view(N, K), zeros, scales, dequantized


def gptq_pack(weight: torch.Tensor, group_size: int, checkpoint_format: str = "gptq", sym: bool = False,
              input_order: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Quantize a float [N, K] matrix the GPTQ way (zero points stored minus one in the classic
    "gptq" format, as they are in "gptq_v2"); `input_order`: act-order, group g quantizes input
    features input_order[g * group_size: (g + 1) * group_size]. Returns ({qweight, qzeros,
    scales, g_idx}, the dequantized float32 weight they stand for)."""
    N, K = weight.shape
    order = torch.arange(K) if input_order is None else input_order
    q_sorted, zeros, scales, dequantized_sorted = quantize_groups(weight[:, order], group_size, sym,
                                                                  min_zero=STORED_ZERO_OFFSET[checkpoint_format])
    q, dequantized, g_idx = torch.empty_like(q_sorted), torch.empty_like(dequantized_sorted), torch.empty(K).int()
    q[:, order], dequantized[:, order] = q_sorted, dequantized_sorted  # back to the checkpoint's input order
    g_idx[order] = (torch.arange(K) // group_size).int()
    tensors = {
        "qweight": _pack_along_rows(q.t()),  # [K/8, N]
        "qzeros": _pack_along_rows(zeros - STORED_ZERO_OFFSET[checkpoint_format]).t().contiguous(),  # [N/8, G] -> [G, N/8]
        "scales": scales.t().contiguous(),  # [G, N]
        "g_idx": g_idx,
    }
    return tensors, dequantized


def write_quantized_checkpoint(source: Path, target: Path, pack, quantization_config: dict,
                               modules=LINEAR_MODULES) -> dict[str, torch.Tensor]:
    """Copy the model directory `source` to `target` with every linear layer named by `modules`
    replaced by `pack(module, weight) -> (tensors by part, dequantized weight)`; returns {HF module
    name: its dequantized float32 weight}."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    dequantized = {}
    for name in [n for n in tensors if n.endswith(".weight") and n.removesuffix(".weight").endswith(modules)]:
        module = name.removesuffix(".weight")
        packed, dequantized[module] = pack(module, tensors.pop(name))
        tensors.update({f"{module}.{part}": t for part, t in packed.items()})
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (target / "config.json").write_text(json.dumps(config))
    return dequantized


def write_gptq_checkpoint(source: Path, target: Path, group_size: int, quantization_config: dict | None = None,
                          checkpoint_format: str = "gptq", modules=LINEAR_MODULES) -> dict[str, torch.Tensor]:
    """Copy the model directory `source` to `target` with every decoder linear layer GPTQ-packed;
    returns {HF module name: its dequantized float32 weight}."""
    return write_quantized_checkpoint(
        source, target, lambda module, w: gptq_pack(w, group_size, checkpoint_format),
        quantization_config or {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                                "sym": False, "checkpoint_format": checkpoint_format}, modules)


def write_float_checkpoint(source: Path, target: Path, weights: dict[str, torch.Tensor]) -> None:
    """Copy `source` to `target` with the given modules' weights replaced (the float reference)."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    tensors.update({f"{module}.weight": w for module, w in weights.items()})
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def _pipeline(path):
    return splitfuse.pipeline(path, backend="cpu", kv_cache_gib=0.01)


@pytest.mark.parametrize("arch,group_size,checkpoint_format",
                         [("llama", 32, "gptq"), ("llama", 64, "gptq_v2"), ("qwen2", 32, "gptq")])  # qwen2: qkv biases
def test_gptq_checkpoint_loads_exactly_and_generates_as_its_dequantized_weights(tiny_model_dir, tmp_path, arch,
                                                                              group_size, checkpoint_format, caplog):
    source = tiny_model_dir(arch)
    dequantized = write_gptq_checkpoint(source, tmp_path / "gptq", group_size, checkpoint_format=checkpoint_format)
    write_float_checkpoint(source, tmp_path / "float", dequantized)

    with caplog.at_level(logging.INFO, logger="splitfuse"):
        pipe = _pipeline(tmp_path / "gptq")
    assert "GPTQ int4 checkpoint: 8 quantized matrices (from 14 layers)" in caplog.text
    weights = pipe.engine.model.weights
    for name, weight, expected in fused_layers(weights, dequantized):
        assert isinstance(weight, QuantizedWeight) and weight.group_size == group_size
        assert torch.equal(weight.dequantize(torch.float32), expected), name
    assert all(isinstance(weights[n], torch.Tensor) for n in ("embed_tokens.weight", "lm_head.weight"))

    assert_generates_as(pipe, tmp_path / "float")


# our fused matrix -> the checkpoint modules whose rows it concatenates
FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "o": ("self_attn.o_proj",), "down": ("mlp.down_proj",)}


def fused_layers(weights: dict, dequantized: dict[str, torch.Tensor], num_layers: int = 2):
    """(our name, the loaded weight, the packer's dequantized float32 rows it stands for) of every
    fused linear layer of a tiny llama-layout model."""
    for layer in range(num_layers):
        for ours, modules in FUSED.items():
            expected = torch.cat([dequantized[f"model.layers.{layer}.{m}"] for m in modules])
            yield f"layers.{layer}.{ours}.weight", weights[f"layers.{layer}.{ours}.weight"], expected


def drop(name: str):
    """A damage: checkpoint tensor `name` removed."""
    return lambda tensors: tensors.pop(name)


def replace(name: str, make):
    """A damage: checkpoint tensor `name` replaced by make(it)."""
    return lambda tensors: tensors.__setitem__(name, make(tensors[name]))


def assert_refused_at_load(path: Path, damage, message: str) -> None:
    """After `damage(tensors)` (None: none) to the checkpoint at `path`, loading it fails with `message`."""
    if damage:
        tensors = load_file(path / "model.safetensors")
        damage(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        _pipeline(path)


def assert_generates_as(pipe, reference_path: Path, prompts=None) -> None:
    """Greedy tokens of `pipe` equal those of the model at `reference_path` (near-ties accepted)."""
    prompts = prompts or make_prompts()
    ours = _greedy(pipe, prompts)
    assert all(len(o.token_ids) == 8 for o in ours)
    references = _greedy(_pipeline(reference_path), prompts, logprobs=2)
    problems = [p for p in (_divergence(len(q), o.token_ids, r) for q, o, r in zip(prompts, ours, references)) if p]
    assert not problems, "\n".join(problems)


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True},
     "quant_method='bitsandbytes' is not supported; supported: GPTQ 4-bit"),
    ({**GPTQ, "bits": 8}, "bits=8 (gptq) is not supported; supported: GPTQ 4-bit"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format='marlin' is not supported"),
    ({**GPTQ, "is_marlin_format": True}, "is_marlin_format=true (Marlin-repacked GPTQ) is not supported"),
])
def test_unsupported_quantization_configs_are_refused_at_load(tiny_model_dir, tmp_path, config, message):
    write_gptq_checkpoint(tiny_model_dir("llama"), tmp_path / "model", 32, quantization_config=config)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        _pipeline(tmp_path / "model")


def test_a_layer_without_scales_is_refused(tiny_model_dir, tmp_path):
    path = tmp_path / "model"
    write_gptq_checkpoint(tiny_model_dir("llama"), path, 32)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=re.escape("'model.layers.1.mlp.up_proj' lacks model.layers.1.mlp.up_proj.scales")):
        _pipeline(path)


def test_a_group_size_not_dividing_in_features_is_refused(tiny_model_dir, tmp_path):
    path = tmp_path / "model"
    write_gptq_checkpoint(tiny_model_dir("llama"), path, 32, quantization_config={**GPTQ, "group_size": 48})
    with pytest.raises(ModelLoadError, match="group_size 48 does not divide its in_features 128"):
        _pipeline(path)


def test_a_quantized_checkpoint_with_on_the_fly_quantization_is_refused(tiny_model_dir, tmp_path):
    write_gptq_checkpoint(tiny_model_dir("llama"), tmp_path / "model", 32)
    with pytest.raises(ModelLoadError, match=re.escape("quantization='int4' was given for a checkpoint already "
                                                      "quantized (quantization_config.quant_method='gptq')")):
        splitfuse.pipeline(tmp_path / "model", backend="cpu", quantization="int4", kv_cache_gib=0.01)


def test_gptq_checkpoint_of_a_model_that_rearranges_its_matrices_is_refused(tmp_path):
    source = make_tiny_model(tmp_path / "falcon", "falcon")
    modules = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    assert write_gptq_checkpoint(source, tmp_path / "model", 32, modules=modules)
    with pytest.raises(ModelLoadError, match="GPTQ checkpoints of FalconForCausalLM are not supported"):
        _pipeline(tmp_path / "model")
