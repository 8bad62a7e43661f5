"""GPTQ with act-order (desc_act=true): each group quantizes a scattered set of input features,
named by g_idx. A tiny llama packed that way (groups 32/64/128, symmetric and asymmetric) loads into
weights that dequantize exactly to the packer's, generates as its dequantized float32 twin, and
malformed GPTQ checkpoints are refused at load naming what is wrong."""

from __future__ import annotations

import zlib

import pytest
import torch

from splitfuse.quant.gptq import ActOrderWeight, GptqConfig
from splitfuse.testing.tiny_model import make_tiny_model
from test_gptq import _pipeline, assert_generates_as, assert_refused_at_load, drop, fused_layers, gptq_pack, replace, \
    write_float_checkpoint, write_quantized_checkpoint

# modules reading the same input share one activation order, as GPTQ derives it from that input
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def activation_order(module: str, in_features: int) -> torch.Tensor:
    """A fixed random order of the input features, the same for modules that share their input."""
    head, _, last = module.rpartition(".")
    key = f"{head}.{SHARED_INPUT.get(last, last)}"
    return torch.randperm(in_features, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))


def gptq_config(group_size: int, sym: bool, **overrides) -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": True, "sym": sym,
            "checkpoint_format": "gptq", **overrides}


def write_act_order_checkpoint(source, target, group_size: int, sym: bool, config: dict | None = None, order=None):
    order = order or activation_order
    return write_quantized_checkpoint(
        source, target, lambda module, w: gptq_pack(w, group_size, sym=sym, input_order=order(module, w.shape[1])),
        config or gptq_config(group_size, sym))


@pytest.fixture(scope="module")
def llama_128(tmp_path_factory):
    """A tiny llama whose every in_features is a multiple of 128."""
    return make_tiny_model(tmp_path_factory.mktemp("llama128"), "llama", hidden_size=128, intermediate_size=256)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_act_order_layers_dequantize_exactly(llama_128, tmp_path, group_size, sym):
    dequantized = write_act_order_checkpoint(llama_128, tmp_path / "gptq", group_size, sym)
    engine = _pipeline(tmp_path / "gptq").engine
    assert engine.settings.quantization == f"gptq int4 (group {group_size}, act-order)"
    for name, weight, expected in fused_layers(engine.model.weights, dequantized):
        # a single group (K = group_size) has no order to keep
        assert isinstance(weight, ActOrderWeight) == (weight.shape[1] > group_size), name
        assert weight.group_size == group_size
        assert torch.equal(weight.dequantize(torch.float32), expected), name
        x = torch.randn(3, weight.shape[1])
        torch.testing.assert_close(engine.backend.linear(x, weight), x @ expected.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size,sym", [(32, False), (128, True)], ids=["g32-asym", "g128-sym"])
def test_act_order_checkpoint_generates_as_its_dequantized_weights(llama_128, tmp_path, group_size, sym):
    dequantized = write_act_order_checkpoint(llama_128, tmp_path / "gptq", group_size, sym)
    write_float_checkpoint(llama_128, tmp_path / "float", dequantized)
    assert_generates_as(_pipeline(tmp_path / "gptq"), tmp_path / "float")


def test_act_order_weight_moves_with_its_order():
    tensors, dequantized = gptq_pack(torch.randn(16, 64), 32, input_order=torch.randperm(64))
    weight = GptqConfig(32, desc_act=True).layer_weight("m", tensors, torch.float32)
    moved = weight.to("cpu")
    assert isinstance(moved, ActOrderWeight) and torch.equal(moved.dequantize(), dequantized)
    assert weight.nbytes == 16 * 32 + 16 * 2 * 4 + 16 * 2 + 64 * 8  # data, float32 scales, uint8 zeros, int64 order


UP = "model.layers.1.mlp.up_proj"
BAD_GPTQ = [
    pytest.param({}, drop(f"{UP}.qzeros"), None, f"GPTQ layer '{UP}' lacks {UP}.qzeros", id="missing-qzeros"),
    pytest.param({}, drop(f"{UP}.g_idx"), None, f"GPTQ layer '{UP}' lacks {UP}.g_idx, which desc_act=true",
                 id="missing-g_idx"),
    pytest.param({}, replace(f"{UP}.scales", lambda t: t[:-1]), None,
                 f"GPTQ layer '{UP}': scales has shape (3, 256), expected (4, 256)", id="scales-shape"),
    pytest.param({}, replace(f"{UP}.g_idx", lambda t: t[:-1]), None,
                 f"GPTQ layer '{UP}': g_idx has shape (127,), expected (128,)", id="g_idx-shape"),
    pytest.param({}, replace(f"{UP}.g_idx", lambda t: torch.where(t == 1, 0, t)), None,
                 f"GPTQ layer '{UP}': g_idx must give each of the 4 groups exactly group_size=32 input features; "
                 "it gives [64, 0, 32, 32]", id="g_idx-uneven"),
    pytest.param({}, replace(f"{UP}.g_idx", lambda t: t + 1), None,
                 f"GPTQ layer '{UP}': g_idx holds groups 1..4, expected 0..3", id="g_idx-range"),
    pytest.param({}, None, lambda module, k: torch.randperm(k), "act-order parts fused into one matrix (q/k/v or "
                 "gate/up) order their input features differently", id="orders-differ"),
    pytest.param({"group_size": 48}, None, None, "group_size 48 does not divide its in_features 256",
                 id="group-size"),
    pytest.param({"bits": 3}, None, None, "quantization_config.bits=3 (gptq) is not supported", id="bits"),
]


@pytest.mark.parametrize("config,damage,order,message", BAD_GPTQ)
def test_malformed_gptq_checkpoints_are_refused_at_load(llama_128, tmp_path, config, damage, order, message):
    path = tmp_path / "gptq"
    write_act_order_checkpoint(llama_128, path, 32, False, {**gptq_config(32, False), **config}, order)
    assert_refused_at_load(path, damage, message)
