"""Quantize a loaded model's linear-layer matrices in place (on-the-fly, weight-only).

What is quantized: every 2-D `.weight` of a decoder layer that the model passes to `linear`
(attention qkv and output, MLP gate/up and down, shared-expert MLPs), and the stacked routed
experts of a mixture-of-experts layer (3-D: each expert becomes its own QuantizedWeight, see
splitfuse/quant/experts.py). What stays in the model's dtype: embeddings and the LM head (as
GPTQ/AWQ checkpoints keep them: every token's choice goes through them), norms, biases and MoE
routers (a small matrix whose rounding would move routing decisions).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from splitfuse.models.weight_tables import ROW, STACKED_DOWN, expected_sources, split_of
from splitfuse.parallel.shard import SINGLE, Shard
from splitfuse.quant.experts import ExpertWeights
from splitfuse.quant.weights import INT4_GROUP_SIZES, QuantizedWeight, int4_group_size, quantize, quantize_int4

log = logging.getLogger("splitfuse")

_KEPT_IN_FULL_PRECISION = ("norm", "router")
_ROUTED_EXPERTS = (".experts.gate_up", ".experts.down")


def is_quantizable(name: str, tensor) -> bool:
    """Whether on-the-fly quantization replaces weight `name` (our name, see module docstring)."""
    return (isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.is_floating_point()
            and name.startswith("layers.") and name.endswith(".weight")
            and not any(part in name for part in _KEPT_IN_FULL_PRECISION))


def is_routed_experts(name: str, tensor) -> bool:
    """Whether weight `name` is a stacked routed-experts tensor [E, N, K] on-the-fly quantization replaces."""
    return (isinstance(tensor, torch.Tensor) and tensor.dim() == 3 and tensor.is_floating_point()
            and name.startswith("layers.") and name.endswith(_ROUTED_EXPERTS))


def quantize_model(model, backend, format: str) -> list[str]:
    """Replace the model's quantizable matrices by QuantizedWeight objects in `format` (routed
    experts by ExpertWeights), each in the layout the backend's linear reads; returns the names
    kept in full precision (and logs why)."""
    weights = model.weights
    shard = getattr(model, "shard", SINGLE)
    row_parallel = row_parallel_weights(model) if format == "int4" else frozenset()
    kept = []
    for name in list(weights):
        tensor = weights[name]
        if is_routed_experts(name, tensor):
            matrices = list(tensor)
        elif is_quantizable(name, tensor):
            matrices = [tensor]
        else:
            kept.append(name)
            continue
        if format == "int4" and tensor.shape[-1] % 2:
            kept.append(name)  # two int4 values share a byte: an odd width cannot be packed
            log.warning("%s: in_features %d is odd, kept in %s", name, tensor.shape[-1], tensor.dtype)
            continue
        if format == "int4":
            group = int4_group_on_rank(name, tensor.shape[-1], shard, name in row_parallel)
            quantized = tuple(backend.prepare_linear_weight(quantize_int4(m, group)) for m in matrices)
        else:
            quantized = tuple(backend.prepare_linear_weight(quantize(m, format)) for m in matrices)
        weights[name] = ExpertWeights(quantized) if tensor.dim() == 3 else quantized[0]
    model.quantization = format
    return kept


def row_parallel_weights(model) -> frozenset[str]:
    """Our names of the matrices whose input features tensor parallelism splits (ROW splits): each
    rank quantizes only its slice of K, so int4 groups must not cross from one rank's slice to the next."""
    if getattr(model, "shard", SINGLE).size == 1:
        return frozenset()
    return frozenset(ours for ours, sources in expected_sources(model).items()
                     if split_of(model, sources[0].replace("<e>", "0")) in (ROW, STACKED_DOWN))


def int4_group_on_rank(name: str, in_features: int, shard: Shard, is_row_parallel: bool) -> int:
    """The int4 group size of weight `name` holding `in_features` (this rank's) input features:
    as with one rank, except where a row-parallel slice needs a smaller group (logged), or refuse."""
    if not is_row_parallel:
        return int4_group_size(in_features)
    full = in_features * shard.size
    group = next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)
    if group is None:
        raise ValueError(f"quantization='int4' with tensor_parallel_size={shard.size}: {name} splits its {full} "
                         f"input features into {in_features} per rank, which no int4 group size "
                         f"{INT4_GROUP_SIZES} divides; use a tensor_parallel_size that leaves a multiple of "
                         f"{INT4_GROUP_SIZES[-1]} per rank, or quantization='int8'")
    if group != int4_group_size(full):
        log.warning("%s: int4 groups of %d input features, not %d as with one rank: tensor_parallel_size=%d leaves "
                    "%d of its %d per rank", name, group, int4_group_size(full), shard.size, in_features, full)
    return group


def weight_bytes(weights: Mapping[str, object]) -> int:
    """Bytes the model's weights hold on the device, quantized or not."""
    return sum(w.nbytes if isinstance(w, (QuantizedWeight, ExpertWeights)) else w.numel() * w.element_size()
               for w in weights.values())


def dequantize_model(model) -> None:
    """Replace every QuantizedWeight (and ExpertWeights) by its dequantized matrix (stacked tensor)
    in the model's dtype: the float reference a quantized model is compared with."""
    for name, weight in model.weights.items():
        if isinstance(weight, (QuantizedWeight, ExpertWeights)):
            model.weights[name] = weight.dequantize(model.dtype)
