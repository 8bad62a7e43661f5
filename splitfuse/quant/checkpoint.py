"""Load a quantized checkpoint: pick its format from config.json's `quantization_config`
(quant_method), then turn each quantized linear layer into a QuantizedWeight placed where the
model's weight tables put its `.weight`: fused as they fuse it (q/k/v, gate/up), and one per
expert for a mixture-of-experts layer's routed experts (ExpertWeights). The rest loads as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from splitfuse.models.base import CausalLM
from splitfuse.parallel.shard import SINGLE
from splitfuse.parallel.sharding import Slices
from splitfuse.quant.awq import SUPPORTED as AWQ_SUPPORTED
from splitfuse.quant.awq import read_awq_config
from splitfuse.quant.compressed_tensors import SUPPORTED as COMPRESSED_TENSORS_SUPPORTED
from splitfuse.quant.compressed_tensors import read_compressed_tensors_config
from splitfuse.quant.experts import ExpertWeights
from splitfuse.quant.fp8 import SUPPORTED as FP8_SUPPORTED
from splitfuse.quant.fp8 import read_fp8_config
from splitfuse.quant.gptq import SUPPORTED as GPTQ_SUPPORTED
from splitfuse.quant.gptq import ActOrderWeight, read_gptq_config
from splitfuse.quant.packed import Int4Checkpoint, UnsupportedQuantization
from splitfuse.quant.sharded import shard_quantized
from splitfuse.quant.weights import QuantizedWeight

log = logging.getLogger("splitfuse")

# quant_method -> reader of its quantization_config
READERS: dict[str, Callable[[Mapping], Int4Checkpoint]] = {
    "gptq": read_gptq_config,
    "awq": read_awq_config,
    "compressed-tensors": read_compressed_tensors_config,
    "fp8": read_fp8_config,
}
SUPPORTED = f"{GPTQ_SUPPORTED}; {AWQ_SUPPORTED}; compressed-tensors: {COMPRESSED_TENSORS_SUPPORTED}; {FP8_SUPPORTED}"

__all__ = ["READERS", "UnsupportedQuantization", "load_quantized_weights", "read_quantization_config"]


def read_quantization_config(config: Mapping | None) -> Int4Checkpoint | None:
    """The checkpoint's `quantization_config` (None: not quantized) -> its format, or refuse by name."""
    if config is None:
        return None
    config = dict(config)
    method = config.get("quant_method")
    if method not in READERS:
        raise UnsupportedQuantization(f"quantization_config.quant_method={method!r} is not supported; "
                                      f"supported: {SUPPORTED}")
    return READERS[method](config)


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Quantized matrices of one format stacked along output features (fused q/k/v, gate/up)."""
    first = weights[0]
    if len(weights) == 1:
        return first
    key = lambda w: (w.format, w.group_size, w.shape[1], w.input_quant)  # noqa: E731
    if any(key(w) != key(first) for w in weights):
        raise UnsupportedQuantization("quantized parts fused into one matrix differ in format, group_size, "
                                      "in_features or input quantization: "
                                      + ", ".join(f"{w.format} {w.shape} g={w.group_size} input {w.input_quant}"
                                                  for w in weights))
    orders = [getattr(w, "input_order", None) for w in weights]
    if any(o is None for o in orders) != all(o is None for o in orders) or (
            orders[0] is not None and any(not torch.equal(o, orders[0]) for o in orders)):
        raise UnsupportedQuantization("act-order parts fused into one matrix (q/k/v or gate/up) order their input "
                                      "features differently (g_idx); only a shared order is supported")
    cat = lambda field: None if getattr(first, field) is None else torch.cat(  # noqa: E731
        [getattr(w, field) for w in weights])
    fields = (first.format, cat("data"), cat("scales"), cat("zeros"), first.group_size,
              (sum(w.shape[0] for w in weights), first.shape[1]), first.dtype, first.layout, first.input_quant)
    return QuantizedWeight(*fields) if orders[0] is None else ActOrderWeight(*fields, input_order=orders[0])


def split_quantized_layers(named_tensors: Iterable[tuple[str, torch.Tensor]],
                           claims: Callable[[str, torch.Tensor], bool], layers: dict[str, dict[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass plain tensors through; collect `<module>.<part>` the format claims into `layers`."""
    for name, tensor in named_tensors:
        module, _, part = name.rpartition(".")
        if claims(part, tensor):
            layers.setdefault(module, {})[part] = tensor
        else:
            yield name, tensor


def _rank_slices(model, name: str, shape) -> Slices | None:
    """This tensor-parallel rank's slices of checkpoint tensor `name` of `shape` (None: all of it)."""
    return model.checkpoint_slice(name, list(shape)) if getattr(model, "shard", SINGLE).size > 1 else None


def _rank_slice(model, name: str, tensor: torch.Tensor) -> torch.Tensor:
    slices = _rank_slices(model, name, tensor.shape)
    return tensor if slices is None else slices.read(tensor)


def load_quantized_weights(model, named_tensors: Iterable[tuple[str, torch.Tensor]], fmt: Int4Checkpoint,
                           backend) -> None:
    """Load a quantized checkpoint into `model`: quantized layers become QuantizedWeights (fused as
    the model's tables fuse `<module>.weight`, one per expert for routed experts), the rest loads as usual."""
    label = fmt.label
    if type(model).load_weights is not CausalLM.load_weights and not getattr(model, "loads_quantized_weights", False):
        raise UnsupportedQuantization(f"{label} checkpoints of {type(model).__name__} are not supported: its loader "
                                      "rearranges loaded matrices, which quantized ones do not allow yet")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    plain = [(name, _rank_slice(model, name, tensor))  # small: embeddings, norms, head
             for name, tensor in split_quantized_layers(named_tensors, fmt.claims, layers)]
    fused: dict[str, dict[int, list[QuantizedWeight]]] = {}
    counts: dict[str, int] = {}
    for module, parts in layers.items():
        try:
            ours, part = model.map_weight_name(f"{module}.weight")
        except KeyError:
            raise UnsupportedQuantization(f"{label} layer {module!r} is not a weight {type(model).__name__} "
                                          "knows") from None
        if ours is None:
            continue
        if not ours.startswith("layers."):
            raise UnsupportedQuantization(f"{label} layer {module!r} ({ours}): only the decoder layers' "
                                          "matrices can be quantized")
        index, count = part or (0, 1)
        weight = fmt.layer_weight(module, parts, model.dtype)
        slices = _rank_slices(model, f"{module}.weight", weight.shape)  # as the float matrix would be cut
        fused.setdefault(ours, {})[index] = [weight] if slices is None else shard_quantized(weight, slices, label,
                                                                                             module)
        counts[ours] = count
    for ours, parts in fused.items():
        if len(parts) != counts[ours]:
            raise UnsupportedQuantization(f"{label} checkpoint holds {len(parts)} of the {counts[ours]} quantized "
                                          f"parts of {ours}")
        prepare = lambda w: backend.prepare_linear_weight(w.to(backend.device))  # noqa: E731
        ordered = [parts[i] for i in range(counts[ours])]  # each: this rank's pieces of that part
        joined = lambda group: concat_rows([piece for pieces in group for piece in pieces])  # noqa: E731
        if ".experts." in ours:  # per expert e: its parts e * slots .. (e + 1) * slots
            slots = counts[ours] // model.num_experts
            experts = ExpertWeights(tuple(joined(ordered[e * slots:(e + 1) * slots])
                                          for e in range(model.num_experts)))
            model.weights[ours] = experts.map(prepare)
        else:
            model.weights[ours] = prepare(joined(ordered))
    model.load_weights(plain)
    model.quantization = fmt.describe()
    kind = f"{label} int4" if isinstance(fmt, Int4Checkpoint) else label
    log.info("%s checkpoint: %d quantized matrices (from %d layers), the rest in %s", kind, len(fused),
             len(layers), str(model.dtype).replace("torch.", ""))
