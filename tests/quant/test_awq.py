"""AWQ 4-bit checkpoints (version "gemm"): a tiny llama packed here from AutoAWQ's documented GEMM
layout loads, with no flag, into QuantizedWeights that dequantize exactly to the packer's weights,
generates the tokens of the same model holding those weights as plain float32, and malformed
checkpoints are refused at load naming what is wrong."""

from __future__ import annotations

import pytest
import torch

from splitfuse.quant import QuantizedWeight
from splitfuse.testing.tiny_model import make_tiny_model
from test_gptq import _pipeline, assert_generates_as, assert_refused_at_load, drop, fused_layers, quantize_groups, \
    replace, write_float_checkpoint, write_quantized_checkpoint

# AutoAWQ's GEMM packing: output features 8c .. 8c+7 of a row go into int32 column c, feature
# 8c + ORDER[i] in bits 4i .. 4i+3 (the order its CUDA kernel dequantizes in).
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def awq_pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> int32 [R, C/8] in AWQ's interleaved order."""
    R, C = values.shape
    v = values.to(torch.int64).view(R, C // 8, 8)[:, :, ORDER]  # slot i holds feature 8c + ORDER[i]
    packed = (v << torch.arange(0, 32, 4)).sum(dim=2)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement


def awq_pack(weight: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A float [N, K] -> ({qweight [K, N/8], qzeros [G, N/8], scales [G, N]}, its dequantized float32)."""
    q, zeros, scales, dequantized = quantize_groups(weight, group_size)
    return {"qweight": awq_pack_columns(q.t()), "qzeros": awq_pack_columns(zeros.t()),
            "scales": scales.t().contiguous()}, dequantized


def test_the_packer_follows_the_documented_order():
    features = torch.arange(8)[None, :]  # row 0: output feature n holds the value n
    assert awq_pack_columns(features).item() == 0x75316420  # nibble i = ORDER[i]


@pytest.fixture(scope="module")
def llama_128(tmp_path_factory):
    """A tiny llama whose every in_features is a multiple of AWQ's usual group of 128."""
    return make_tiny_model(tmp_path_factory.mktemp("llama128"), "llama", hidden_size=128, intermediate_size=256)


def write_awq_checkpoint(source, target, group_size=128, config=None):
    return write_quantized_checkpoint(source, target, lambda module, w: awq_pack(w, group_size),
                                      config or {**AWQ, "group_size": group_size})


def test_awq_checkpoint_loads_exactly_and_generates_as_its_dequantized_weights(llama_128, tmp_path):
    dequantized = write_awq_checkpoint(llama_128, tmp_path / "awq")
    write_float_checkpoint(llama_128, tmp_path / "float", dequantized)

    pipe = _pipeline(tmp_path / "awq")
    assert pipe.engine.settings.quantization == "awq int4 (group 128)"
    for name, weight, expected in fused_layers(pipe.engine.model.weights, dequantized):
        assert isinstance(weight, QuantizedWeight) and weight.group_size == 128
        assert torch.equal(weight.dequantize(torch.float32), expected), name
    assert_generates_as(pipe, tmp_path / "float")


UP = "model.layers.1.mlp.up_proj"
BAD_AWQ = [
    pytest.param({}, drop(f"{UP}.qzeros"), f"AWQ layer '{UP}' lacks {UP}.qzeros", id="missing-qzeros"),
    pytest.param({}, drop(f"{UP}.scales"), f"AWQ layer '{UP}' lacks {UP}.scales", id="missing-scales"),
    pytest.param({}, replace(f"{UP}.scales", lambda t: t[:, :-8]),
                 f"AWQ layer '{UP}': scales has shape (1, 248), expected (1, 256)", id="scales-shape"),
    pytest.param({}, replace(f"{UP}.qzeros", lambda t: torch.cat([t, t])),
                 f"AWQ layer '{UP}': qzeros has shape (2, 32), expected (1, 32)", id="qzeros-shape"),
    pytest.param({}, replace(f"{UP}.qweight", lambda t: t.float()),
                 f"AWQ layer '{UP}': qweight has dtype torch.float32, expected torch.int32", id="qweight-dtype"),
    pytest.param({"group_size": 96}, None, "mlp.down_proj': group_size 96 does not divide its in_features 256",
                 id="group-size"),
    pytest.param({"bits": 8}, None, "quantization_config.bits=8 (awq) is not supported", id="bits"),
    pytest.param({"version": "gemv"}, None, "quantization_config.version='gemv' (awq) is not supported", id="gemv"),
    pytest.param({"zero_point": False}, None, "quantization_config.zero_point=false (awq) is not supported",
                 id="no-zero-point"),
]


@pytest.mark.parametrize("config,damage,message", BAD_AWQ)
def test_malformed_awq_checkpoints_are_refused_at_load(llama_128, tmp_path, config, damage, message):
    path = tmp_path / "awq"
    write_awq_checkpoint(llama_128, path, config={**AWQ, **config})
    assert_refused_at_load(path, damage, message)
