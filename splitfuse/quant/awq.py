"""AWQ 4-bit checkpoints, version "gemm" (AutoAWQ's GEMM layout, what transformers and vLLM load).

Per linear layer `<module>` (weight [N, K]: N output, K input features, G = K / group_size groups):
- `qweight` int32 [K, N/8]: eight output features per element, interleaved: value i (bits
  4*i..) of qweight[k, c] is output feature 8*c + AWQ_ORDER[i] of input feature k;
- `qzeros` int32 [G, N/8]: the zero points, packed the same way;
- `scales` float16 [G, N];
- w[n, k] = (q - zero) * scale, with the zero and scale of group k // group_size (no offset).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from splitfuse.quant.gptq import read_group_size
from splitfuse.quant.packed import Int4Checkpoint, UnsupportedQuantization, int4_weight, unpack_nibbles
from splitfuse.quant.weights import QuantizedWeight

SUPPORTED = "AWQ 4-bit (bits=4, version gemm, zero_point=true)"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # value i of a packed int32 -> output feature 8*c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(j) for j in range(8))  # output feature 8*c + j -> its value


def unpack_awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] in AWQ's interleaved order -> values [R, 8*C] in output-feature order."""
    values = unpack_nibbles(packed, 1).view(packed.shape[0], packed.shape[1], 8)
    return values[:, :, list(AWQ_REVERSE_ORDER)].flatten(1)


@dataclass(frozen=True)
class AwqConfig(Int4Checkpoint):
    label: ClassVar[str] = "AWQ"
    parts: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")
    required_parts: ClassVar[tuple[str, ...]] = parts

    def layer_weight(self, module: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> QuantizedWeight:
        self.require(module, parts)
        qweight = parts["qweight"]
        K, N = qweight.shape[0], qweight.shape[1] * 8
        group_size, groups = self.groups(module, K)
        self.check_shapes(module, parts, {"qzeros": (groups, N // 8), "scales": (groups, N)})
        q = unpack_awq_columns(qweight).t()  # [N, K]
        zeros = unpack_awq_columns(parts["qzeros"]).t()  # [N, G]
        return int4_weight(q, zeros, parts["scales"].t(), group_size, dtype)


def read_awq_config(config: Mapping) -> AwqConfig:
    """A `quantization_config` with quant_method "awq" -> AwqConfig, or refuse by name (AutoAWQ's
    own key names w_bit / q_group_size are read too)."""
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        raise UnsupportedQuantization(f"quantization_config.bits={bits!r} (awq) is not supported; "
                                      f"supported: {SUPPORTED}")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedQuantization(f"quantization_config.version={config.get('version')!r} (awq) is not "
                                      f"supported; supported: {SUPPORTED}")
    if not config.get("zero_point", True):
        raise UnsupportedQuantization(f"quantization_config.zero_point=false (awq) is not supported; "
                                      f"supported: {SUPPORTED}")
    return AwqConfig(read_group_size(config, "group_size", "q_group_size"))
