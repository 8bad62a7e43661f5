"""Weight-only quantization: the QuantizedWeight object `Backend.linear` accepts, its quantizers,
and quantize-on-load of a model's linear layers."""

from splitfuse.quant.model import dequantize_model, is_quantizable, quantize_model, weight_bytes
from splitfuse.quant.weights import FORMATS, QuantizedWeight, quantize

__all__ = ["FORMATS", "QuantizedWeight", "dequantize_model", "is_quantizable",
           "quantize", "quantize_model", "weight_bytes"]
