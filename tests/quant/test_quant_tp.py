"""Quantized weights with tensor parallelism: on-the-fly int8/int4 quantize each rank's own slices,
and a quantized checkpoint (GPTQ, AWQ, compressed-tensors) is cut per rank with its scales and zero
points; two ranks give the tokens one rank gives, and what cannot be cut is refused by name."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import splitfuse
from splitfuse.backends.cpu import CpuBackend
from splitfuse.models.loader import ModelLoadError, load_model
from splitfuse.parallel.shard import Shard
from splitfuse.quant import QuantizedWeight, quantize_model
from splitfuse.testing.parity import make_prompts
from splitfuse.testing.tiny_model import make_tiny_model
from test_awq import write_awq_checkpoint
from test_compressed_tensors import SCHEMES, write_compressed_tensors_checkpoint
from test_gptq import write_float_checkpoint, write_gptq_checkpoint
from test_gptq_act_order import write_act_order_checkpoint
from test_quantization import _divergence

PROMPTS = [make_prompts()[i] for i in (0, 2, 3)]  # 1, 7 and 33 tokens
SMALL = dict(backend="cpu", token_budget=32, kv_block_size=4, num_kv_blocks=128)


def _generate(path, **settings):
    pipe = splitfuse.pipeline(path, **SMALL, **settings)
    try:
        return pipe(PROMPTS, max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    finally:
        pipe.close()


def assert_two_ranks_give_the_tokens_of_one(path, **settings) -> None:
    """Greedy tokens with tensor_parallel_size=2 equal those of one rank (near-ties of one rank accepted)."""
    one, two = _generate(path, **settings), _generate(path, tensor_parallel_size=2, **settings)
    problems = [p for p in (_divergence(len(q), b.token_ids, a) for q, a, b in zip(PROMPTS, one, two)) if p]
    assert not problems, "\n".join(problems)


def test_on_the_fly_int8_and_int4_with_two_ranks_give_the_tokens_of_one_rank(tmp_path):
    # o_proj and down_proj split their 256 and 512 input features into 128 and 256 per rank: int4
    # keeps groups of 128 as with one rank; int8's per-row scale is the max over the rank's slice
    path = make_tiny_model(tmp_path / "llama", "llama", hidden_size=256, intermediate_size=512)
    for quantization in ("int8", "int4"):
        assert_two_ranks_give_the_tokens_of_one(path, quantization=quantization)


def _rank_model(path, rank: int, size: int = 2, quantization: str | None = None):
    backend = CpuBackend()
    model = load_model(path, backend, shard=Shard(rank, size)).model
    if quantization:
        quantize_model(model, backend, quantization)
    return model


def test_int4_groups_never_cross_a_ranks_slice_of_input_features(tiny_model_dir, caplog):
    # tiny llama: o_proj has 64 input features (groups of 64 with one rank), down_proj 128 (groups of 128)
    with caplog.at_level(logging.WARNING, logger="splitfuse"):
        weights = _rank_model(tiny_model_dir("llama"), 1, quantization="int4").weights
    groups = {name.split(".")[2]: w.group_size for name, w in weights.items() if isinstance(w, QuantizedWeight)}
    assert groups == {"qkv": 64, "o": 32, "gate_up": 64, "down": 64}
    assert "layers.0.o.weight: int4 groups of 32 input features, not 64 as with one rank: " \
           "tensor_parallel_size=2 leaves 32 of its 64 per rank" in caplog.text
    with pytest.raises(ValueError, match=re.escape(
            "quantization='int4' with tensor_parallel_size=4: layers.0.o.weight splits its 64 input features into "
            "16 per rank, which no int4 group size (128, 64, 32) divides")):
        _rank_model(tiny_model_dir("llama"), 0, size=4, quantization="int4")


def _assert_ranks_hold_the_float_models_slices(quantized_path, float_path) -> None:
    """Each rank's quantized matrices dequantize to that rank's slices of the float model."""
    for rank in range(2):
        ours, floats = _rank_model(quantized_path, rank).weights, _rank_model(float_path, rank).weights
        quantized = [n for n, w in ours.items() if isinstance(w, QuantizedWeight)]
        assert len(quantized) == 8
        for name in quantized:
            torch.testing.assert_close(ours[name].dequantize(torch.float32), floats[name], msg=name)
        assert all(torch.equal(ours[n], floats[n]) for n in ours if n not in quantized)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_each_rank_of_a_packed_int4_checkpoint_holds_its_slices(tiny_model_dir, tmp_path, fmt):
    write = write_gptq_checkpoint if fmt == "gptq" else write_awq_checkpoint
    dequantized = write(tiny_model_dir("llama"), tmp_path / fmt, group_size=32)
    write_float_checkpoint(tiny_model_dir("llama"), tmp_path / "float", dequantized)
    _assert_ranks_hold_the_float_models_slices(tmp_path / fmt, tmp_path / "float")


def test_a_gptq_checkpoint_with_two_ranks_gives_the_tokens_of_one_rank(tiny_model_dir, tmp_path):
    path = tmp_path / "gptq"
    write_gptq_checkpoint(tiny_model_dir("llama"), path, 32)
    assert_two_ranks_give_the_tokens_of_one(path)


def test_what_a_rank_cannot_cut_is_refused_by_name(tiny_model_dir, tmp_path):
    write_gptq_checkpoint(tiny_model_dir("llama"), tmp_path / "g64", 64)  # down_proj: 128 input features
    with pytest.raises(ModelLoadError, match=re.escape(
            "GPTQ layer 'model.layers.0.mlp.down_proj': this rank's input features 0..32 of 128 cut through its "
            "groups of 64; use a tensor_parallel_size that leaves a multiple of 64 input features per rank")):
        _rank_model(tmp_path / "g64", 0, size=4)
    write_act_order_checkpoint(tiny_model_dir("llama"), tmp_path / "act_order", 32, sym=False)
    with pytest.raises(ModelLoadError, match=re.escape(
            "GPTQ layer 'model.layers.0.mlp.down_proj': this rank's input features 64..128 of 128: a matrix in "
            "layout 'act_order' (act-order) spreads each group over all its input features, so tensor "
            "parallelism cannot split them; use tensor_parallel_size=1")):
        _rank_model(tmp_path / "act_order", 1)


@pytest.mark.parametrize("scheme", ["int8-w8a16-channel-naive", "int8-w8a16-group32-packed", "int4-w4a16-group32",
                                    "fp8-w8a16-channel", "fp8-w8a8-static-tensor"])
def test_each_rank_of_a_compressed_tensors_checkpoint_holds_its_slices(tiny_model_dir, tmp_path, scheme):
    path = write_compressed_tensors_checkpoint(Path(tiny_model_dir("llama")), tmp_path / scheme, *SCHEMES[scheme])
    with torch.no_grad():  # the library's own decompression is the float model
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(
            dequantize=True)).save_pretrained(tmp_path / "float")
    _assert_ranks_hold_the_float_models_slices(path, tmp_path / "float")


def test_dynamically_quantized_activations_of_a_row_parallel_matrix_are_refused(tiny_model_dir, tmp_path):
    path = write_compressed_tensors_checkpoint(Path(tiny_model_dir("llama")), tmp_path / "w8a8",
                                               *SCHEMES["fp8-w8a8-dynamic-token"])
    with pytest.raises(ModelLoadError, match=re.escape(
            "compressed-tensors layer 'model.layers.0.mlp.down_proj': this rank's input features 0..64 of 128: its "
            "activations are quantized per token (dynamic), which a rank cannot do on its slice")):
        _rank_model(path, 0)
