"""Pre-quantized checkpoints: pick the reader for `quantization_config.quant_method`, and load the
layers a format stores as several tensors each into QuantizedWeights fused as the model fuses them.

A format module gives `read_config(dict) -> its config`, a config object with `name` (for errors),
`describe()` (for the load log), `is_part(part, tensor)` (does this tensor belong to a quantized
layer?) and `to_quantized_weight(module, parts, dtype)`; `load_quantized_checkpoint` does the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch

from splitfuse.models.base import CausalLM
from splitfuse.quant import compressed_tensors, fp8, gptq
from splitfuse.quant.gptq import UnsupportedQuantization
from splitfuse.quant.weights import QuantizedWeight

log = logging.getLogger("splitfuse")

# quant_method -> (reader of its quantization_config, what is supported, in words)
READERS: dict[str, tuple[Callable[[Mapping], object], str]] = {
    "gptq": (gptq.read_quantization_config, gptq.SUPPORTED),
    "compressed-tensors": (compressed_tensors.read_config, compressed_tensors.SUPPORTED),
    "fp8": (fp8.read_config, fp8.SUPPORTED),
}


def read_checkpoint_quantization(config: Mapping):
    """The checkpoint's quantization_config -> its format's config object, or refuse by name."""
    method = config.get("quant_method")
    if method not in READERS:
        supported = "; ".join(f"{name!r}: {words}" if name != "gptq" else words
                              for name, (_, words) in READERS.items())
        raise UnsupportedQuantization(f"quantization_config.quant_method={method!r} is not supported; "
                                      f"supported: {supported}")
    return READERS[method][0](config)


def load_quantized_checkpoint(model, named_tensors: Iterable[tuple[str, torch.Tensor]], config, backend) -> None:
    """Load a checkpoint whose config `read_checkpoint_quantization` read: quantized layers (the
    tensors `config.is_part` claims, grouped by module) become QuantizedWeights where the model's
    tables put `<module>.weight`, fused as it fuses them; the rest loads as usual."""
    label = config.name
    if type(model).load_weights is not CausalLM.load_weights:
        raise UnsupportedQuantization(f"{label} checkpoints of {type(model).__name__} are not supported: its loader "
                                      "rearranges loaded matrices, which quantized ones do not allow yet")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    plain = []  # small: embeddings, norms, head, biases, layers kept in float
    for name, tensor in named_tensors:
        module, _, part = name.rpartition(".")
        if config.is_part(part, tensor):
            layers.setdefault(module, {})[part] = tensor
        else:
            plain.append((name, tensor))
    fused: dict[str, dict[int, QuantizedWeight]] = {}
    counts: dict[str, int] = {}
    for module, parts in layers.items():
        try:
            ours, part = model.map_weight_name(f"{module}.weight")
        except KeyError:
            raise UnsupportedQuantization(f"{label} layer {module!r} is not a weight {type(model).__name__} "
                                          "knows") from None
        if ours is None:
            continue
        if not ours.startswith("layers.") or ".experts." in ours:
            raise UnsupportedQuantization(f"{label} layer {module!r} ({ours}): only the decoder layers' "
                                          "attention and MLP matrices can be quantized")
        index, count = part or (0, 1)
        fused.setdefault(ours, {})[index] = config.to_quantized_weight(module, parts, model.dtype)
        counts[ours] = count
    for ours, parts in fused.items():
        if len(parts) != counts[ours]:
            raise UnsupportedQuantization(f"{label} checkpoint holds {len(parts)} of the {counts[ours]} quantized "
                                          f"parts of {ours}")
        weight = concat_rows(ours, [parts[i] for i in range(counts[ours])])
        model.weights[ours] = backend.prepare_linear_weight(weight.to(backend.device))
    model.load_weights(plain)
    log.info("%s checkpoint: %d quantized matrices (from %d layers), the rest in %s", config.describe(), len(fused),
             len(layers), str(model.dtype).replace("torch.", ""))


def concat_rows(name: str, weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Quantized matrices of one format (portable layout) stacked along output features: fused
    q/k/v or gate/up. Their group sizes, input widths and input quantization must agree."""
    first = weights[0]
    if len(weights) == 1:
        return first
    key = lambda w: (w.format, w.group_size, w.shape[1], w.input_quant)  # noqa: E731
    if any(key(w) != key(first) for w in weights):
        raise UnsupportedQuantization(f"the quantized parts fused into {name} differ in format, group size, "
                                      "in_features or input quantization: "
                                      + ", ".join(f"{w.format} {w.shape} group {w.group_size} input {w.input_quant}"
                                                  for w in weights))
    cat = lambda field: None if getattr(first, field) is None else torch.cat(  # noqa: E731
        [getattr(w, field) for w in weights])
    return QuantizedWeight(first.format, cat("data"), cat("scales"), cat("zeros"), first.group_size,
                           (sum(w.shape[0] for w in weights), first.shape[1]), first.dtype,
                           input_quant=first.input_quant)
