"""GPTQ 4-bit checkpoints (the AutoGPTQ / GPTQModel "GEMM" layout transformers documents): read
`quantization_config`, refuse what is not supported, and turn each quantized linear layer into a
QuantizedWeight (splitfuse.quant.checkpoint places it where the model's weight tables put its
`.weight`).

Per linear layer `<module>` (weight [N, K]: N output, K input features, G = K / group_size groups):
- `qweight` int32 [K/8, N]: input feature k of column n is bits 4*(k%8).. of qweight[k//8, n];
- `qzeros` int32 [G, N/8]: output feature n's stored zero is bits 4*(n%8).. of qzeros[g, n//8];
- `scales` float16 [G, N]; optional `g_idx` int32 [K] (must be k // group_size: no act-order);
- w[n, k] = (q - zero) * scale, zero = stored + 1 in the classic format (checkpoint_format "gptq",
  AutoGPTQ's off-by-one), zero = stored in GPTQModel's "gptq_v2".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from splitfuse.quant.weights import QuantizedWeight, pack_int4

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
    name = "GPTQ"  # in errors (splitfuse.quant.checkpoint loads the layers)

    def describe(self) -> str:
        return "GPTQ int4"

    def is_part(self, part: str, tensor: torch.Tensor) -> bool:
        return part in PARTS

    def to_quantized_weight(self, module: str, parts: Mapping[str, torch.Tensor],
                            dtype: torch.dtype) -> QuantizedWeight:
        return to_quantized_weight(module, parts, self, dtype)


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
