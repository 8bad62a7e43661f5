"""FP8 weights from checkpoints: transformers' fine-grained `fp8` quant_method (block-wise scales, as
Qwen3-FP8 and DeepSeek-V3 ship), and the block/channel/tensor scale shapes every FP8 format shares.

Per linear layer `<module>` (weight [N, K]) of an `fp8` checkpoint:
- `weight` float8_e4m3fn [N, K];
- `weight_scale_inv` float32 [ceil(N / bn), ceil(K / bk)] for weight_block_size [bn, bk] (one
  scale when weight_block_size is null): w[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]
  (despite its name the scale multiplies).
activation_scheme "dynamic" quantizes activations per token group in transformers' FP8 GPU kernels;
transformers dequantizes such a checkpoint at load on a CPU and runs the matmul in the compute dtype,
and so does splitfuse on every backend (weight-only numerics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from splitfuse.quant.activations import InputQuantizer
from splitfuse.quant.packed import UnsupportedQuantization
from splitfuse.quant.weights import QuantizedWeight

SUPPORTED = ("fp8: fine-grained FP8 (float8_e4m3fn weights, float32 scales per [bn, bk] block or per tensor, "
             "activation_scheme dynamic)")
FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Fp8Config:
    block: tuple[int, int] | None  # (bn, bk) rows and input features sharing one scale; None: per tensor

    label: ClassVar[str] = "fp8"  # how messages name the format

    def describe(self) -> str:
        """The quantization in effect, as engine.settings reports it ("fp8 (block 128x128)")."""
        return "fp8 (" + (f"block {self.block[0]}x{self.block[1]}" if self.block else "per tensor") + ")"

    def claims(self, part: str, tensor: torch.Tensor) -> bool:
        return part == "weight_scale_inv" or (part == "weight" and tensor.dtype == FP8_DTYPE)

    def layer_weight(self, module: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype) -> QuantizedWeight:
        require_parts(module, parts, ("weight", "weight_scale_inv"), "fp8")
        weight = parts["weight"]
        return fp8_weight(module, weight, parts["weight_scale_inv"], self.block or tuple(weight.shape), dtype)


def read_fp8_config(config: Mapping) -> Fp8Config:
    """transformers' FineGrainedFP8Config as config.json holds it -> Fp8Config, or refuse by name."""
    refuse = lambda field, expected: UnsupportedQuantization(  # noqa: E731
        f"quantization_config.{field}={config.get(field)!r} (fp8) is not supported; expected {expected}")
    if str(config.get("activation_scheme", "dynamic")).lower() != "dynamic":
        raise refuse("activation_scheme", "'dynamic'")
    if config.get("fmt", "e4m3") != "e4m3":
        raise refuse("fmt", "'e4m3'")
    if config.get("scale_fmt", "float") != "float":
        raise refuse("scale_fmt", "'float' (float32 scales)")
    if config.get("modules_to_convert"):
        raise refuse("modules_to_convert", "none (FP8 embeddings are not supported)")
    block = config.get("weight_block_size")
    if block is not None:
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise refuse("weight_block_size", "two positive integers or null")
        block = tuple(block)
    return Fp8Config(block)


def require_parts(module: str, parts: Mapping[str, torch.Tensor], names: tuple[str, ...], label: str) -> None:
    missing = [p for p in names if p not in parts]
    if missing:
        raise UnsupportedQuantization(f"{label} layer {module!r} lacks {', '.join(f'{module}.{p}' for p in missing)}")


def fp8_weight(module: str, weight: torch.Tensor, block_scales: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype, input_quant: InputQuantizer | None = None) -> QuantizedWeight:
    """An FP8 [N, K] matrix with one scale per [bn, bk] block (per channel: [1, K]; per tensor:
    [N, K]) -> the "fp8" QuantizedWeight, its scales repeated over each block's rows."""
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise UnsupportedQuantization(f"FP8 layer {module!r}: weight is {weight.dim()}-D {weight.dtype}, expected "
                                      "a 2-D float8_e4m3fn matrix")
    N, K = weight.shape
    bn, bk = block
    expected = (math.ceil(N / bn), math.ceil(K / bk))
    if block_scales.numel() != expected[0] * expected[1] or (block_scales.dim() == 2
                                                             and tuple(block_scales.shape) != expected):
        raise UnsupportedQuantization(f"FP8 layer {module!r}: scale has shape {tuple(block_scales.shape)}, expected "
                                      f"{expected} for weight {(N, K)} and blocks of {list(block)}")
    scales = block_scales.float().reshape(expected).repeat_interleave(bn, dim=0)[:N].contiguous()
    return QuantizedWeight("fp8", weight, scales, None, bk, (N, K), dtype, input_quant=input_quant)
