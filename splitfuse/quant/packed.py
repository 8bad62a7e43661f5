"""What the packed 4-bit checkpoint formats (GPTQ, AWQ) share: the error they raise, reading
nibbles out of int32 columns, checking a layer's tensors, and the portable int4 weight they become.

A format (`Int4Checkpoint` subclass) turns one layer's tensors `<module>.<part>` into a
QuantizedWeight; splitfuse.quant.checkpoint does the rest (fusing, experts, loading).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from splitfuse.quant.weights import QuantizedWeight, pack_int4

NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # 8 values of 4 bits in an int32


class UnsupportedQuantization(ValueError):
    """A checkpoint's quantization_config (or a layer of it) this loader cannot serve."""


@dataclass(frozen=True)
class Int4Checkpoint(abc.ABC):
    """A packed 4-bit checkpoint format and the settings its quantization_config gave."""

    group_size: int  # -1: one group per input row (the whole K)

    label: ClassVar[str]  # "GPTQ", "AWQ": how messages name the format
    parts: ClassVar[tuple[str, ...]]  # every `<module>.<part>` tensor a quantized layer may hold
    required_parts: ClassVar[tuple[str, ...]]

    def claims(self, part: str, tensor: torch.Tensor) -> bool:
        """Whether checkpoint tensor `<module>.<part>` belongs to a quantized layer."""
        return part in self.parts

    @abc.abstractmethod
    def layer_weight(self, module: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> QuantizedWeight:
        """One layer's tensors -> its QuantizedWeight [N, K] (shapes checked)."""

    def describe(self, *details: str) -> str:
        """The quantization in effect, as engine.settings reports it ("gptq int4 (group 128)")."""
        group = "one group per row" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.label.lower()} int4 ({', '.join((group, *details))})"

    def groups(self, module: str, in_features: int) -> tuple[int, int]:
        """(group size, number of groups) of a layer with `in_features`, or refuse."""
        group_size = in_features if self.group_size == -1 else self.group_size
        if in_features % group_size:
            raise UnsupportedQuantization(f"{self.label} layer {module!r}: group_size {group_size} does not divide "
                                          f"its in_features {in_features}")
        return group_size, in_features // group_size

    def require(self, module: str, parts: Mapping[str, torch.Tensor]) -> None:
        """Refuse a layer that lacks a required tensor or holds one that is not int32 where packed."""
        missing = [p for p in self.required_parts if p not in parts]
        if missing:
            raise UnsupportedQuantization(f"{self.label} layer {module!r} lacks "
                                          + ", ".join(f"{module}.{p}" for p in missing))
        for name in ("qweight", "qzeros"):
            if parts[name].dtype != torch.int32:
                raise UnsupportedQuantization(f"{self.label} layer {module!r}: {name} has dtype {parts[name].dtype}, "
                                              "expected torch.int32 (eight 4-bit values per element)")

    def check_shapes(self, module: str, parts: Mapping[str, torch.Tensor], expected: Mapping[str, tuple]) -> None:
        """Refuse a layer whose tensors' shapes disagree with its qweight and group size."""
        for name, shape in expected.items():
            if name in parts and tuple(parts[name].shape) != tuple(shape):
                raise UnsupportedQuantization(
                    f"{self.label} layer {module!r}: {name} has shape {tuple(parts[name].shape)}, expected "
                    f"{tuple(shape)} for qweight {tuple(parts['qweight'].shape)} and group_size {self.group_size}")


def unpack_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 tensor -> its 4-bit values (0..15) with `dim` eight times longer: value i of an element
    is bits 4*i.. of it, and lands at index 8*j + i along `dim`."""
    values = (packed.to(torch.int32).unsqueeze(-1) >> NIBBLE_SHIFTS) & 15  # [..., 8] last
    values = values.movedim(-1, dim + 1) if dim != packed.dim() - 1 else values
    return values.flatten(dim, dim + 1)


def int4_weight(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                dtype: torch.dtype) -> QuantizedWeight:
    """q [N, K], zero points and scales [N, K / group_size] -> the portable int4 QuantizedWeight."""
    N, K = q.shape
    return QuantizedWeight("int4", pack_int4(q), scales.float().contiguous(), zeros.to(torch.uint8).contiguous(),
                           group_size, (N, K), dtype)
