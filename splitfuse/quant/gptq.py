"""GPTQ 4-bit checkpoints (the AutoGPTQ / GPTQModel "GEMM" layout transformers documents): read
`quantization_config`, refuse what is not supported, and turn each quantized linear layer into a
QuantizedWeight placed where the model's weight tables put its `.weight`.

Per linear layer `<module>` (weight [N, K]: N output, K input features, G = K / group_size groups):
- `qweight` int32 [K/8, N]: input feature k of column n is bits 4*(k%8).. of qweight[k//8, n];
- `qzeros` int32 [G, N/8]: output feature n's stored zero is bits 4*(n%8).. of qzeros[g, n//8];
- `scales` float16 [G, N]; optional `g_idx` int32 [K] (must be k // group_size: no act-order);
- w[n, k] = (q - zero) * scale, zero = stored + 1 in the classic format (checkpoint_format "gptq",
  AutoGPTQ's off-by-one), zero = stored in GPTQModel's "gptq_v2".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from splitfuse.models.base import CausalLM
from splitfuse.quant.weights import QuantizedWeight, pack_int4

log = logging.getLogger("splitfuse")

SUPPORTED = "GPTQ 4-bit (bits=4, desc_act=false, checkpoint_format gptq or gptq_v2)"
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # format -> what is added to a stored zero point
PARTS = ("qweight", "qzeros", "scales", "g_idx")
REQUIRED_PARTS = ("qweight", "qzeros", "scales")


class UnsupportedQuantization(ValueError):
    """A checkpoint's quantization_config (or a layer of it) this loader cannot serve."""


@dataclass(frozen=True)
class GptqConfig:
    group_size: int  # -1 in config.json: one group per input row (group_size = K)
    zero_offset: int  # added to a stored zero point: 1 for the classic format, 0 for gptq_v2


def read_quantization_config(config: Mapping | None) -> GptqConfig | None:
    """The checkpoint's `quantization_config` (None: not quantized) -> GptqConfig, or refuse by name."""
    if config is None:
        return None
    config = dict(config)
    method = config.get("quant_method")
    if method != "gptq":
        raise UnsupportedQuantization(f"quantization_config.quant_method={method!r} is not supported; "
                                      f"supported: {SUPPORTED}")
    if config.get("bits") != 4:
        raise UnsupportedQuantization(f"quantization_config.bits={config.get('bits')!r} (gptq) is not "
                                      f"supported; supported: {SUPPORTED}")
    if config.get("desc_act"):
        raise UnsupportedQuantization("quantization_config.desc_act=true (act-order g_idx) is not "
                                      f"supported; supported: {SUPPORTED}")
    if config.get("is_marlin_format"):
        raise UnsupportedQuantization("quantization_config.is_marlin_format=true (Marlin-repacked GPTQ) is not "
                                      f"supported; supported: {SUPPORTED}")
    checkpoint_format = config.get("checkpoint_format") or "gptq"
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise UnsupportedQuantization(f"quantization_config.checkpoint_format={checkpoint_format!r} is not "
                                      f"supported; supported: {SUPPORTED}")
    group_size = config.get("group_size", 128)
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise UnsupportedQuantization(f"quantization_config.group_size={group_size!r}: expected a positive "
                                      "integer or -1 (one group per row)")
    return GptqConfig(group_size, CHECKPOINT_FORMATS[checkpoint_format])


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                zero_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ tensors -> (q [N, K], zero points [N, G], scales [N, G] float32), our orientation."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = (qweight.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & 15  # [K/8, 8, N]
    zeros = (qzeros.to(torch.int32)[:, :, None] >> shifts[None, None, :]) & 15  # [G, N/8, 8]
    return q.flatten(0, 1).t(), (zeros.flatten(1) + zero_offset).t(), scales.float().t()


def to_quantized_weight(module: str, parts: Mapping[str, torch.Tensor], config: GptqConfig,
                        dtype: torch.dtype) -> QuantizedWeight:
    """One GPTQ layer's tensors -> a QuantizedWeight in the portable int4 layout (checked shapes)."""
    missing = [p for p in REQUIRED_PARTS if p not in parts]
    if missing:
        raise UnsupportedQuantization(f"GPTQ layer {module!r} lacks {', '.join(f'{module}.{p}' for p in missing)}")
    qweight, qzeros, scales = (parts[p] for p in REQUIRED_PARTS)
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    group_size = K if config.group_size == -1 else config.group_size
    if K % group_size:
        raise UnsupportedQuantization(f"GPTQ layer {module!r}: group_size {group_size} does not divide its "
                                      f"in_features {K}")
    groups = K // group_size
    expected = {"qzeros": (groups, N // 8), "scales": (groups, N)}
    for name, shape in expected.items():
        if tuple(parts[name].shape) != shape:
            raise UnsupportedQuantization(f"GPTQ layer {module!r}: {name} has shape {tuple(parts[name].shape)}, "
                                          f"expected {shape} for qweight {tuple(qweight.shape)} and group_size "
                                          f"{group_size}")
    if "g_idx" in parts and not torch.equal(parts["g_idx"].long(), torch.arange(K) // group_size):
        raise UnsupportedQuantization(f"GPTQ layer {module!r}: g_idx is not k // group_size (act-order); "
                                      f"supported: {SUPPORTED}")
    q, zeros, scales = unpack_gptq(qweight, qzeros, scales, config.zero_offset)
    return QuantizedWeight("int4", pack_int4(q), scales.contiguous(), zeros.to(torch.uint8).contiguous(),
                           group_size, (N, K), dtype)


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Portable int4 matrices stacked along output features (fused q/k/v, gate/up)."""
    first = weights[0]
    if any(w.group_size != first.group_size or w.shape[1] != first.shape[1] for w in weights):
        raise UnsupportedQuantization("GPTQ parts fused into one matrix differ in group_size or in_features: "
                                      + ", ".join(f"{w.shape} g={w.group_size}" for w in weights))
    cat = lambda field: torch.cat([getattr(w, field) for w in weights])  # noqa: E731
    return QuantizedWeight("int4", cat("data"), cat("scales"), cat("zeros"), first.group_size,
                           (sum(w.shape[0] for w in weights), first.shape[1]), first.dtype)


def split_gptq_layers(named_tensors: Iterable[tuple[str, torch.Tensor]],
                      layers: dict[str, dict[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass plain tensors through; collect `<module>.<qweight|qzeros|scales|g_idx>` into `layers`."""
    for name, tensor in named_tensors:
        module, _, part = name.rpartition(".")
        if part in PARTS:
            layers.setdefault(module, {})[part] = tensor
        else:
            yield name, tensor


def load_gptq_weights(model, named_tensors: Iterable[tuple[str, torch.Tensor]], config: GptqConfig,
                      backend) -> None:
    """Load a GPTQ checkpoint into `model`: quantized layers become QuantizedWeights (fused as the
    model's tables fuse `<module>.weight`), the rest loads as usual."""
    if type(model).load_weights is not CausalLM.load_weights:
        raise UnsupportedQuantization(f"GPTQ checkpoints of {type(model).__name__} are not supported: its loader "
                                      "rearranges loaded matrices, which quantized ones do not allow yet")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    plain = list(split_gptq_layers(named_tensors, layers))  # small: embeddings, norms, head, biases
    fused: dict[str, dict[int, QuantizedWeight]] = {}
    counts: dict[str, int] = {}
    for module, parts in layers.items():
        try:
            ours, part = model.map_weight_name(f"{module}.weight")
        except KeyError:
            raise UnsupportedQuantization(f"GPTQ layer {module!r} is not a weight {type(model).__name__} "
                                          "knows") from None
        if ours is None:
            continue
        if not ours.startswith("layers.") or ".experts." in ours:
            raise UnsupportedQuantization(f"GPTQ layer {module!r} ({ours}): only the decoder layers' "
                                          "attention and MLP matrices can be GPTQ-quantized")
        index, count = part or (0, 1)
        fused.setdefault(ours, {})[index] = to_quantized_weight(module, parts, config, model.dtype)
        counts[ours] = count
    for ours, parts in fused.items():
        if len(parts) != counts[ours]:
            raise UnsupportedQuantization(f"GPTQ checkpoint holds {len(parts)} of the {counts[ours]} quantized "
                                          f"parts of {ours}")
        weight = concat_rows([parts[i] for i in range(counts[ours])])
        model.weights[ours] = backend.prepare_linear_weight(weight.to(backend.device))
    model.load_weights(plain)
    log.info("GPTQ int4 checkpoint: %d quantized matrices (from %d layers), the rest in %s", len(fused),
             len(layers), str(model.dtype).replace("torch.", ""))
