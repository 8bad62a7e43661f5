"""Quantize a loaded model's linear-layer matrices in place (on-the-fly, weight-only).

What is quantized: every 2-D `.weight` of a decoder layer that the model passes to `linear`
(attention qkv and output, MLP gate/up and down, shared-expert MLPs). What stays in the model's
dtype: embeddings and the LM head (as GPTQ/AWQ checkpoints keep them: every token's choice goes
through them), norms, biases, MoE routers (a small matrix whose rounding would move routing
decisions), and the stacked MoE expert tensors (3-D; `moe_experts` takes plain tensors only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from splitfuse.quant.weights import QuantizedWeight, quantize

log = logging.getLogger("splitfuse")

_KEPT_IN_FULL_PRECISION = ("norm", "router")


def is_quantizable(name: str, tensor) -> bool:
    """Whether on-the-fly quantization replaces weight `name` (our name, see module docstring)."""
    return (isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.is_floating_point()
            and name.startswith("layers.") and name.endswith(".weight")
            and not any(part in name for part in _KEPT_IN_FULL_PRECISION))


def quantize_model(model, backend, format: str) -> list[str]:
    """Replace the model's quantizable matrices by QuantizedWeight objects in `format`, each in the
    layout the backend's linear reads; returns the names kept in full precision (and logs why)."""
    weights = model.weights
    kept = []
    for name in list(weights):
        tensor = weights[name]
        if not is_quantizable(name, tensor):
            kept.append(name)
            continue
        if format == "int4" and tensor.shape[1] % 2:
            kept.append(name)  # two int4 values share a byte: an odd width cannot be packed
            log.warning("%s: in_features %d is odd, kept in %s", name, tensor.shape[1], tensor.dtype)
            continue
        weights[name] = backend.prepare_linear_weight(quantize(tensor, format))
    experts = [n for n in kept if n.startswith("layers.") and ".experts." in n]
    if experts:
        log.info("quantization %s: %d MoE expert tensors kept in %s (not quantized yet)", format,
                 len(experts), model.dtype)
    return kept


def weight_bytes(weights: Mapping[str, object]) -> int:
    """Bytes the model's weights hold on the device, quantized or not."""
    return sum(w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
               for w in weights.values())


def dequantize_model(model) -> None:
    """Replace every QuantizedWeight by its dequantized matrix in the model's dtype: the float
    reference a quantized model is compared with."""
    for name, weight in model.weights.items():
        if isinstance(weight, QuantizedWeight):
            model.weights[name] = weight.dequantize(model.dtype)
