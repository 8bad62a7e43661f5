"""Quantized routed experts of Mixtral and Qwen2-MoE: quantized at load (int8/int4) and loaded from
GPTQ/AWQ checkpoints holding one packed tensor set per expert. Each expert becomes its own
QuantizedWeight (ExpertWeights), and the model generates as its dequantized float32 twin."""

from __future__ import annotations

import pytest
import torch

from splitfuse.quant import QuantizedWeight
from splitfuse.quant.experts import ExpertWeights
from splitfuse.testing.parity import make_prompts
from splitfuse.testing.tiny_model import make_tiny_model
from test_awq import AWQ, awq_pack
from test_gptq import LINEAR_MODULES, _pipeline, assert_generates_as, gptq_pack, write_float_checkpoint, \
    write_quantized_checkpoint
from test_quantization import assert_matches_dequantized_reference

PROMPTS = make_prompts()[:3]
ATTENTION = tuple(m for m in LINEAR_MODULES if m.startswith("self_attn."))
# (arch, the checkpoint's linear modules: attention, then each expert's (gate, up, down), then the rest)
EXPERTS = {
    "mixtral": (("w1", "w3", "w2"), ()),
    "qwen2_moe": (("gate_proj", "up_proj", "down_proj"),
                  ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")),
}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = make_tiny_model(tmp_path_factory.mktemp(arch), arch)
        return built[arch]

    return get


@pytest.mark.parametrize("arch,quantization", [("mixtral", "int4"), ("qwen2_moe", "int8")])
def test_routed_experts_quantized_at_load_match_their_dequantized_weights(moe_model, arch, quantization):
    pipe = assert_matches_dequantized_reference(moe_model(arch), quantization, prompts=PROMPTS)
    weights = pipe.engine.model.weights
    for name in ("layers.0.experts.gate_up", "layers.1.experts.down"):
        experts = weights[name]
        assert isinstance(experts, ExpertWeights) and len(experts) == 4
        assert all(isinstance(w, QuantizedWeight) and w.format == quantization for w in experts.experts)
    assert isinstance(weights["layers.0.router.weight"], torch.Tensor)  # routing stays in full precision
    assert pipe.engine.settings.quantization == quantization


def _expert_modules(arch: str) -> tuple[str, ...]:
    projections, rest = EXPERTS[arch]
    return ATTENTION + tuple(f".{p}" for p in projections) + rest


PACKERS = {
    "gptq": (lambda module, w: gptq_pack(w, 32), {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                  "desc_act": False}),
    "awq": (lambda module, w: awq_pack(w, 32), {**AWQ, "group_size": 32}),
}


@pytest.mark.parametrize("arch,method", [("mixtral", "gptq"), ("qwen2_moe", "awq")])
def test_quantized_checkpoint_experts_load_exactly_and_generate_as_their_dequantized_weights(
        moe_model, tmp_path, arch, method):
    source = moe_model(arch)
    pack, config = PACKERS[method]
    dequantized = write_quantized_checkpoint(source, tmp_path / method, pack, config, _expert_modules(arch))
    write_float_checkpoint(source, tmp_path / "float", dequantized)

    pipe = _pipeline(tmp_path / method)
    weights = pipe.engine.model.weights
    gate, up, down = EXPERTS[arch][0]
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    for layer in range(2):
        gate_up, experts_down = weights[f"layers.{layer}.experts.gate_up"], weights[f"layers.{layer}.experts.down"]
        assert isinstance(gate_up, ExpertWeights) and isinstance(experts_down, ExpertWeights)
        for e in range(4):
            expert = f"model.layers.{layer}.{block}.experts.{e}"
            expected = torch.cat([dequantized[f"{expert}.{gate}"], dequantized[f"{expert}.{up}"]])
            assert torch.equal(gate_up[e].dequantize(torch.float32), expected), f"{expert} gate_up"
            assert torch.equal(experts_down[e].dequantize(torch.float32), dequantized[f"{expert}.{down}"])
    assert_generates_as(pipe, tmp_path / "float", PROMPTS)
