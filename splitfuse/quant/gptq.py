"""GPTQ 4-bit checkpoints (the AutoGPTQ / GPTQModel "GEMM" layout transformers documents), with or
without act-order (`desc_act`).

Per linear layer `<module>` (weight [N, K]: N output, K input features, G = K / group_size groups):
- `qweight` int32 [K/8, N]: input feature k of column n is bits 4*(k%8).. of qweight[k//8, n];
- `qzeros` int32 [G, N/8]: output feature n's stored zero is bits 4*(n%8).. of qzeros[g, n//8];
- `scales` float16 [G, N]; `g_idx` int32 [K]: the group of input feature k (k // group_size
  unless act-order; required with desc_act);
- w[n, k] = (q - zero) * scale with zero and scale of group g_idx[k]; zero = stored + 1 in the
  classic format (checkpoint_format "gptq", AutoGPTQ's off-by-one), zero = stored in "gptq_v2".

Act-order quantized the input features in order of decreasing activation, so a group's rows are
scattered over K. Loaded, the rows are sorted by group (stable, so by k within a group) into the
portable layout, and the weight remembers that order (ActOrderWeight, layout "act_order"): its
dequantize() puts every column back where the checkpoint had it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from splitfuse.quant.packed import Int4Checkpoint, UnsupportedQuantization, int4_weight, unpack_nibbles
from splitfuse.quant.weights import QuantizedWeight

SUPPORTED = "GPTQ 4-bit (bits=4, checkpoint_format gptq or gptq_v2, with or without desc_act)"
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # format -> what is added to a stored zero point
ACT_ORDER_LAYOUT = "act_order"


@dataclasses.dataclass(frozen=True, eq=False)
class ActOrderWeight(QuantizedWeight):
    """A portable int4 matrix whose columns are the checkpoint's input features sorted by group:
    column j of the packed data is input feature input_order[j]."""

    input_order: torch.Tensor | None = None  # int64 [K]

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.input_order.numel() * self.input_order.element_size()

    def to(self, device: torch.device | str) -> "ActOrderWeight":
        return dataclasses.replace(super().to(device), input_order=self.input_order.to(device))


def dequantize_act_order(weight: ActOrderWeight, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] in the checkpoint's input order."""
    grouped = QuantizedWeight(weight.format, weight.data, weight.scales, weight.zeros, weight.group_size,
                              weight.shape, weight.dtype).dequantize(dtype)
    out = torch.empty_like(grouped)
    out[:, weight.input_order] = grouped
    return out


QuantizedWeight.DEQUANTIZERS[ACT_ORDER_LAYOUT] = dequantize_act_order


@dataclass(frozen=True)
class GptqConfig(Int4Checkpoint):
    zero_offset: int = 1  # added to a stored zero point: 1 for the classic format, 0 for gptq_v2
    desc_act: bool = False

    label: ClassVar[str] = "GPTQ"
    parts: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales", "g_idx")
    required_parts: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")

    def describe(self) -> str:
        return super().describe("act-order") if self.desc_act else super().describe()

    def layer_weight(self, module: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> QuantizedWeight:
        self.require(module, parts)
        if self.desc_act and "g_idx" not in parts:
            raise UnsupportedQuantization(f"GPTQ layer {module!r} lacks {module}.g_idx, which desc_act=true "
                                          "(act-order) checkpoints need")
        qweight = parts["qweight"]
        K, N = qweight.shape[0] * 8, qweight.shape[1]
        group_size, groups = self.groups(module, K)
        self.check_shapes(module, parts, {"qzeros": (groups, N // 8), "scales": (groups, N), "g_idx": (K,)})
        q = unpack_nibbles(qweight, 0).t()  # [N, K]
        zeros = unpack_nibbles(parts["qzeros"], 1).t() + self.zero_offset  # [N, G]
        order = None if "g_idx" not in parts else act_order(module, parts["g_idx"].long(), group_size, groups)
        weight = int4_weight(q if order is None else q[:, order], zeros, parts["scales"].t(), group_size, dtype)
        if order is None:
            return weight
        return ActOrderWeight(weight.format, weight.data, weight.scales, weight.zeros, group_size, weight.shape,
                              dtype, layout=ACT_ORDER_LAYOUT, input_order=order)


def act_order(module: str, g_idx: torch.Tensor, group_size: int, groups: int) -> torch.Tensor | None:
    """The input features sorted by group (stable: by k within a group), or None where g_idx is
    k // group_size already; refuses a g_idx whose groups are not group_size features each."""
    K = g_idx.numel()
    if torch.equal(g_idx, torch.arange(K) // group_size):
        return None
    if g_idx.min() < 0 or g_idx.max() >= groups:
        raise UnsupportedQuantization(f"GPTQ layer {module!r}: g_idx holds groups {int(g_idx.min())}.."
                                      f"{int(g_idx.max())}, expected 0..{groups - 1}")
    counts = torch.bincount(g_idx, minlength=groups)
    if (counts != group_size).any():
        raise UnsupportedQuantization(f"GPTQ layer {module!r}: g_idx must give each of the {groups} groups exactly "
                                      f"group_size={group_size} input features; it gives {counts.tolist()}")
    return torch.argsort(g_idx, stable=True)


def read_gptq_config(config: Mapping) -> GptqConfig:
    """A `quantization_config` with quant_method "gptq" -> GptqConfig, or refuse by name."""
    if config.get("bits") != 4:
        raise UnsupportedQuantization(f"quantization_config.bits={config.get('bits')!r} (gptq) is not "
                                      f"supported; supported: {SUPPORTED}")
    if config.get("is_marlin_format"):
        raise UnsupportedQuantization("quantization_config.is_marlin_format=true (Marlin-repacked GPTQ) is not "
                                      f"supported; supported: {SUPPORTED}")
    checkpoint_format = config.get("checkpoint_format") or "gptq"
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise UnsupportedQuantization(f"quantization_config.checkpoint_format={checkpoint_format!r} is not "
                                      f"supported; supported: {SUPPORTED}")
    return GptqConfig(read_group_size(config, "group_size"), CHECKPOINT_FORMATS[checkpoint_format],
                      bool(config.get("desc_act")))


def read_group_size(config: Mapping, *keys: str) -> int:
    """The first of `keys` in config (128 when none is), checked: a positive integer or -1."""
    key = next((k for k in keys if k in config), keys[0])
    group_size = config.get(key, 128)
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise UnsupportedQuantization(f"quantization_config.{key}={group_size!r}: expected a positive "
                                      "integer or -1 (one group per row)")
    return group_size
