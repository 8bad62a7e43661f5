"""compressed-tensors checkpoints (llm-compressor's output, quant_method "compressed-tensors"): read
`quantization_config`, refuse what is not supported, and turn each quantized linear layer into a
QuantizedWeight. Read from config.json and the tensors alone: the library is not needed to serve.

Per linear layer `<module>` (weight [N, K]), by format:
- float-quantized / naive-quantized FP8: `weight` float8_e4m3fn [N, K], `weight_scale` [1] (tensor),
  [N, 1] (channel) or [ceil(N/bn), ceil(K/bk)] (block): w = weight * scale; W8A8 adds the input's
  FP8 quantization (dynamic per token or per group of K, or static per tensor from `input_scale`),
  emulated as splitfuse.quant.activations describes.
- int-quantized / naive-quantized INT8: `weight` int8 [N, K], `weight_scale` [1], [N, 1] or, per
  group of K, [N, K / group_size]: w = weight * scale (symmetric, weight-only).
- pack-quantized INT4/INT8: `weight_packed` int32 [N, ceil(K * bits / 32)], value k of row n in bits
  bits*(k % (32/bits)) of word k // (32/bits), stored as q + 2^(bits-1); `weight_shape` [N, K];
  `weight_scale` [N, K / group_size]; asymmetric: `weight_zero_point` [N, G] packed the same way
  along N (int32 [ceil(N * bits / 32), G]): w = (q - zero_point) * scale.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from splitfuse.quant.activations import InputQuantizer
from splitfuse.quant.fp8 import FP8_DTYPE, fp8_weight, require_parts
from splitfuse.quant.packed import UnsupportedQuantization, int4_weight, unpack_nibbles
from splitfuse.quant.weights import QuantizedWeight

INT8_GROUPS_LAYOUT = "int8_groups"  # int8 [N, K] with float32 scales [N, K / group_size]; no backend kernel yet


def dequantize_int8_groups(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """[N, K]: each int8 value times its group's scale."""
    scales = weight.scales.float().repeat_interleave(weight.group_size, dim=1)
    return (weight.data.float() * scales).to(dtype)


QuantizedWeight.DEQUANTIZERS[INT8_GROUPS_LAYOUT] = dequantize_int8_groups

SUPPORTED = ("formats float-quantized and naive-quantized (FP8 weights per tensor, channel or block; "
             "activations none, FP8 dynamic per token or group, or FP8 static per tensor), int-quantized and "
             "naive-quantized (INT8 weights per tensor, channel or group, weight-only), pack-quantized (INT4 "
             "weights per group or channel, symmetric or asymmetric; INT8 per tensor, channel or group, symmetric; "
             "weight-only)")
PARTS = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point",
         "weight_g_idx", "weight_global_scale", "input_global_scale")
QUANTIZED_WEIGHT_DTYPES = (FP8_DTYPE, torch.int8)
# (weights type, num_bits) -> formats that store it, strategies splitfuse reads
WEIGHT_SCHEMES = {
    ("float", 8): (("float-quantized", "naive-quantized"), ("tensor", "channel", "block")),
    ("int", 8): (("int-quantized", "naive-quantized", "pack-quantized"), ("tensor", "channel", "group")),
    ("int", 4): (("pack-quantized",), ("group", "channel")),
}
INPUT_STRATEGIES = {False: ("tensor",), True: ("token", "group")}  # dynamic -> strategies


@dataclass(frozen=True)
class Scheme:
    """One config group: which layers (targets) and how their weights and inputs are quantized."""

    name: str
    targets: tuple[str, ...]
    format: str
    type: str  # weights: "float" | "int"
    num_bits: int
    strategy: str  # weights: "tensor" | "channel" | "group" | "block"
    group_size: int | None
    block: tuple[int, int] | None
    symmetric: bool
    input_strategy: str | None  # None: weight-only; "token" | "group" (dynamic) | "tensor" (static)
    input_group_size: int | None

    def describe(self) -> str:
        """"fp8 channel", "int4 group 128 asymmetric", "fp8 block 128x128, input fp8 group"."""
        kind = "fp8" if self.type == "float" else f"int{self.num_bits}"
        strategy = {"group": f"group {self.group_size}",
                    "block": "block " + "x".join(map(str, self.block or ()))}.get(self.strategy, self.strategy)
        words = f"{kind} {strategy}" + ("" if self.symmetric else " asymmetric")
        if self.input_strategy:
            words += f", input fp8 {self.input_strategy}"
        return words

    def matches(self, module: str) -> bool:
        # "Linear" (a class name) targets every linear layer, and only linear layers hold quantized tensors
        return any(t == "Linear" or t == module or (t.startswith("re:") and re.match(t[3:], module))
                   for t in self.targets)


@dataclass(frozen=True)
class CompressedTensorsConfig:
    schemes: tuple[Scheme, ...]

    label: ClassVar[str] = "compressed-tensors"  # how messages name the format

    def describe(self) -> str:
        """The quantization in effect, as engine.settings reports it, one entry per config group
        ("compressed-tensors (fp8 channel, input fp8 token)")."""
        return f"{self.label} ({'; '.join(s.describe() for s in self.schemes)})"

    def claims(self, part: str, tensor: torch.Tensor) -> bool:
        return part in PARTS or (part == "weight" and tensor.dtype in QUANTIZED_WEIGHT_DTYPES)

    def scheme_for(self, module: str) -> Scheme:
        matching = [s for s in self.schemes if s.matches(module)]
        by_name = [s for s in matching if "Linear" not in s.targets]
        if len(by_name or matching) != 1:
            raise UnsupportedQuantization(
                f"compressed-tensors layer {module!r} has quantized tensors and matches "
                f"{[s.name for s in matching] or 'no'} config groups' targets; expected exactly one")
        return (by_name or matching)[0]

    def layer_weight(self, module: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> QuantizedWeight:
        scheme = self.scheme_for(module)
        if "weight_g_idx" in parts:
            raise UnsupportedQuantization(f"compressed-tensors layer {module!r} has a weight_g_idx (activation "
                                          "order, actorder 'group'), which is not supported")
        if scheme.format == "pack-quantized":
            return _packed_weight(module, parts, scheme, dtype)
        require_parts(module, parts, ("weight", "weight_scale"), "compressed-tensors")
        weight, scale = parts["weight"], parts["weight_scale"]
        N, K = weight.shape
        if scheme.type == "float":
            return fp8_weight(module, weight, scale, _scale_block(scheme, N, K), dtype,
                              _input_quant(module, parts, scheme, K))
        if weight.dtype != torch.int8:
            raise UnsupportedQuantization(f"compressed-tensors layer {module!r}: weight is {weight.dtype}, expected "
                                          "int8 for INT8 weights")
        return _int8_weight(module, weight, scale, scheme, dtype)


def read_compressed_tensors_config(config: Mapping) -> CompressedTensorsConfig:
    """config.json's quantization_config -> CompressedTensorsConfig, or refuse what is not supported."""
    def refuse(field: str, value, expected: str) -> UnsupportedQuantization:
        return UnsupportedQuantization(f"quantization_config.{field}={value!r} (compressed-tensors) is not "
                                       f"supported; expected {expected}. Supported: {SUPPORTED}")

    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise refuse("quantization_status", status, "'compressed'")
    for field in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if config.get(field):
            raise refuse(field, config[field], "none")
    groups = config.get("config_groups") or {}
    if not groups:
        raise refuse("config_groups", groups, "at least one group")
    return CompressedTensorsConfig(tuple(_read_group(name, group, config.get("format"), refuse)
                                         for name, group in groups.items()))


def _read_group(name: str, group: Mapping, default_format: str | None, refuse) -> Scheme:
    prefix = f"config_groups.{name}"
    weights = group.get("weights")
    if not weights:
        raise refuse(f"{prefix}.weights", weights, "a weight quantization")
    if group.get("output_activations"):
        raise refuse(f"{prefix}.output_activations", group["output_activations"], "none")
    kind = (weights.get("type"), weights.get("num_bits"))
    if kind not in WEIGHT_SCHEMES:
        raise refuse(f"{prefix}.weights", {"type": kind[0], "num_bits": kind[1]},
                     "FP8 (type 'float', num_bits 8), INT8 or INT4 weights")
    formats, strategies = WEIGHT_SCHEMES[kind]
    format = group.get("format") or default_format
    if format not in formats:
        raise refuse(f"{prefix}.format", format, f"one of {list(formats)} for {kind[0]}{kind[1]} weights")
    strategy = weights.get("strategy")
    if strategy not in strategies:
        raise refuse(f"{prefix}.weights.strategy", strategy,
                     f"one of {list(strategies)} for {kind[0]}{kind[1]} weights")
    if weights.get("dynamic"):
        raise refuse(f"{prefix}.weights.dynamic", weights["dynamic"], "false")
    if weights.get("actorder") == "group":
        raise refuse(f"{prefix}.weights.actorder", "group", "none, 'static' or 'weight'")
    symmetric = weights.get("symmetric", True)
    if not symmetric and kind != ("int", 4):  # zero points are read for packed INT4 only
        raise refuse(f"{prefix}.weights.symmetric", symmetric, f"true for {kind[0]}{kind[1]} weights")
    group_size = weights.get("group_size") if strategy == "group" else None
    if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
        raise refuse(f"{prefix}.weights.group_size", group_size, "a positive integer")
    block = weights.get("block_structure") if strategy == "block" else None
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2 and all(
            isinstance(b, int) and b > 0 for b in block)):
        raise refuse(f"{prefix}.weights.block_structure", block, "two positive integers")
    inputs = group.get("input_activations")
    input_strategy = input_group_size = None
    if inputs:
        dynamic = inputs.get("dynamic")
        if (inputs.get("type"), inputs.get("num_bits")) != ("float", 8) or kind[0] != "float":
            raise refuse(f"{prefix}.input_activations", inputs, "none, or FP8 (type 'float', num_bits 8) with FP8 "
                                                                "weights: INT8 activations are not supported")
        if not inputs.get("symmetric", True):
            raise refuse(f"{prefix}.input_activations.symmetric", False, "true")
        if dynamic not in INPUT_STRATEGIES or inputs.get("strategy") not in INPUT_STRATEGIES[dynamic]:
            # dynamic per tensor would take one scale over a whole ragged batch of unrelated requests
            raise refuse(f"{prefix}.input_activations", {"dynamic": dynamic, "strategy": inputs.get("strategy")},
                         "dynamic 'token' or 'group', or static 'tensor'")
        input_strategy = inputs["strategy"]
        input_group_size = inputs.get("group_size") if input_strategy == "group" else None
    return Scheme(name, tuple(group.get("targets") or ()), format, kind[0], kind[1], strategy, group_size,
                  tuple(block) if block else None, symmetric, input_strategy, input_group_size)


def _scale_block(scheme: Scheme, N: int, K: int) -> tuple[int, int]:
    """The [rows, input features] one weight scale covers."""
    return {"tensor": (N, K), "channel": (1, K), "block": scheme.block}[scheme.strategy]


def _row_scales(module: str, scale: torch.Tensor, scheme: Scheme, N: int) -> torch.Tensor:
    """A per-tensor or per-channel INT8 scale -> float32 [N], one per output row."""
    expected = 1 if scheme.strategy == "tensor" else N
    if scale.numel() != expected:
        raise UnsupportedQuantization(f"compressed-tensors layer {module!r}: weight_scale has shape "
                                      f"{tuple(scale.shape)}, expected {expected} value(s) for strategy "
                                      f"{scheme.strategy!r} and {N} output features")
    return scale.float().reshape(-1).expand(N).contiguous()


def _input_quant(module: str, parts: Mapping[str, torch.Tensor], scheme: Scheme, K: int) -> InputQuantizer | None:
    if scheme.input_strategy is None:
        return None
    if scheme.input_strategy == "tensor":
        require_parts(module, parts, ("input_scale",), "compressed-tensors")
        if parts["input_scale"].numel() != 1:
            raise UnsupportedQuantization(f"compressed-tensors layer {module!r}: input_scale has shape "
                                          f"{tuple(parts['input_scale'].shape)}, expected one value (per tensor)")
        return InputQuantizer("tensor", float(parts["input_scale"].float().reshape(()).item()))
    if scheme.input_strategy == "group" and (not scheme.input_group_size or K % scheme.input_group_size):
        raise UnsupportedQuantization(f"compressed-tensors layer {module!r}: input_activations.group_size "
                                      f"{scheme.input_group_size} does not divide its in_features {K}")
    return InputQuantizer(scheme.input_strategy, group_size=scheme.input_group_size)


def _groups(module: str, scale: torch.Tensor, scheme: Scheme, N: int, K: int) -> tuple[int, int]:
    """(group size, groups) of a per-group (or per-channel: one group) layer, its weight_scale checked."""
    group_size = scheme.group_size or K
    if K % group_size:
        raise UnsupportedQuantization(f"compressed-tensors layer {module!r}: group_size {group_size} does not divide "
                                      f"its in_features {K}")
    groups = K // group_size
    if tuple(scale.shape) != (N, groups):
        raise UnsupportedQuantization(f"compressed-tensors layer {module!r}: weight_scale has shape "
                                      f"{tuple(scale.shape)}, expected {(N, groups)} for weight_shape {[N, K]} and "
                                      f"group_size {group_size}")
    return group_size, groups


def _int8_weight(module: str, q: torch.Tensor, scale: torch.Tensor, scheme: Scheme,
                 dtype: torch.dtype) -> QuantizedWeight:
    """Symmetric INT8 values [N, K] and their scales -> the "int8" QuantizedWeight: one scale per row
    (per tensor or channel), or per group of K in the INT8_GROUPS_LAYOUT."""
    N, K = q.shape
    if scheme.strategy != "group":
        return QuantizedWeight("int8", q, _row_scales(module, scale, scheme, N), None, K, (N, K), dtype)
    group_size, _ = _groups(module, scale, scheme, N, K)
    return QuantizedWeight("int8", q.contiguous(), scale.float().contiguous(), None, group_size, (N, K), dtype,
                           layout=INT8_GROUPS_LAYOUT)


def unpack_bytes(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] holding four 8-bit values each, lowest bits first -> int64 [R, 4 W] (0..255)."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int64)
    return ((packed.to(torch.int64)[:, :, None] >> shifts) & 255).flatten(1)


def _packed_weight(module: str, parts: Mapping[str, torch.Tensor], scheme: Scheme,
                   dtype: torch.dtype) -> QuantizedWeight:
    """A pack-quantized layer -> "int4" (offset values and zero points) or "int8" QuantizedWeight."""
    zero_points = () if scheme.symmetric else ("weight_zero_point",)
    required = ("weight_packed", "weight_shape", "weight_scale") + zero_points
    require_parts(module, parts, required, "compressed-tensors")
    packed, scale, bits = parts["weight_packed"], parts["weight_scale"], scheme.num_bits
    N, K = (int(v) for v in parts["weight_shape"].tolist())
    words = -(-K * bits // 32)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (N, words):
        raise UnsupportedQuantization(f"compressed-tensors layer {module!r}: weight_packed is {packed.dtype} "
                                      f"{tuple(packed.shape)}, expected int32 {(N, words)} for weight_shape {[N, K]} "
                                      f"at {bits} bits")
    offset = 1 << (bits - 1)
    # stored values q + offset, 0 .. 2^bits - 1
    q = (unpack_bytes(packed) if bits == 8 else unpack_nibbles(packed, dim=1))[:, :K]
    if bits == 8:
        return _int8_weight(module, (q - offset).to(torch.int8), scale, scheme, dtype)
    if K % 2:
        raise UnsupportedQuantization(f"compressed-tensors layer {module!r}: its in_features {K} is odd")
    group_size, groups = _groups(module, scale, scheme, N, K)
    if scheme.symmetric:
        zeros = torch.full((N, groups), offset, dtype=torch.int64)
    else:
        zero_points = parts["weight_zero_point"]
        if tuple(zero_points.shape) != (-(-N * bits // 32), groups):
            raise UnsupportedQuantization(f"compressed-tensors layer {module!r}: weight_zero_point has shape "
                                          f"{tuple(zero_points.shape)}, expected {(-(-N * bits // 32), groups)}")
        zeros = unpack_nibbles(zero_points, dim=0)[:N]  # packed along N, stored offset like q
    return int4_weight(q, zeros, scale, group_size, dtype)
