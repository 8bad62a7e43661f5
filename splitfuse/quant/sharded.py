"""A tensor-parallel rank's part of a quantized checkpoint matrix: the checkpoint's layer, read whole
and turned into the portable QuantizedWeight, is cut as the float matrix would be (see
splitfuse/parallel/sharding.py), its scales and zero points with it.

Cutting output rows (column-parallel) keeps every row's scales. Cutting input features
(row-parallel) keeps a group's scale only where the rank's range holds whole groups; a per-row
scale (int8, fp8 per channel, int4 with one group per row) stays valid for any range.
"""

from __future__ import annotations

import dataclasses

from splitfuse.parallel.sharding import Slices
from splitfuse.quant.gptq import ACT_ORDER_LAYOUT
from splitfuse.quant.packed import UnsupportedQuantization
from splitfuse.quant.weights import QuantizedWeight


def shard_quantized(weight: QuantizedWeight, slices: Slices, label: str, module: str) -> list[QuantizedWeight]:
    """This rank's pieces of `weight` [N, K], each a QuantizedWeight, in the order they join along rows."""
    if slices.dim != 0:
        raise UnsupportedQuantization(f"{label} layer {module!r}: tensor-parallel split along dimension "
                                      f"{slices.dim} of a quantized matrix is not supported")
    return [_cut(weight, index, label, module) for index in slices.pieces]


def _cut(weight: QuantizedWeight, index: tuple[slice, ...], label: str, module: str) -> QuantizedWeight:
    N, K = weight.shape
    rows = range(N)[index[0]]
    weight = _rows(weight, slice(rows.start, rows.stop))
    if len(index) == 1:
        return weight
    columns = range(K)[index[1]]
    return _columns(weight, columns.start, columns.stop, label, module)


def _rows(weight: QuantizedWeight, rows: slice) -> QuantizedWeight:
    cut = lambda t: None if t is None else t[rows].contiguous()  # noqa: E731
    count = len(range(weight.shape[0])[rows])
    return dataclasses.replace(weight, data=cut(weight.data), scales=cut(weight.scales), zeros=cut(weight.zeros),
                               shape=(count, weight.shape[1]))


def _columns(weight: QuantizedWeight, start: int, stop: int, label: str, module: str) -> QuantizedWeight:
    """Input features start..stop of a row-parallel matrix, or refuse where they split what one rank needs whole."""
    N, K = weight.shape
    where = f"{label} layer {module!r}: this rank's input features {start}..{stop} of {K}"
    if weight.layout == ACT_ORDER_LAYOUT:  # a group's features are scattered over every rank's range
        raise UnsupportedQuantization(f"{where}: a matrix in layout {weight.layout!r} (act-order) spreads each "
                                      "group over all its input features, so tensor parallelism cannot split "
                                      "them; use tensor_parallel_size=1")
    if weight.input_quant is not None and weight.input_quant.strategy != "tensor":
        raise UnsupportedQuantization(f"{where}: its activations are quantized per {weight.input_quant.strategy} "
                                      "(dynamic), which a rank cannot do on its slice; use tensor_parallel_size=1")
    pack = 2 if weight.format == "int4" else 1  # int4 "rows": two values per byte (other layouts: one)
    group = weight.group_size
    if group >= K:  # one scale per row: valid for any range of it
        scales, zeros, group = weight.scales, weight.zeros, stop - start
    elif start % group or (stop % group and stop != K):
        raise UnsupportedQuantization(f"{where} cut through its groups of {group}; use a tensor_parallel_size "
                                      f"that leaves a multiple of {group} input features per rank")
    else:
        groups = slice(start // group, -(-stop // group))
        scales = weight.scales[:, groups].contiguous()
        zeros = None if weight.zeros is None else weight.zeros[:, groups].contiguous()
    if start % pack or stop % pack:
        raise UnsupportedQuantization(f"{where} split a byte of two int4 values")
    data = weight.data[:, start // pack: stop // pack].contiguous()
    return dataclasses.replace(weight, data=data, scales=scales, zeros=zeros, group_size=group,
                               shape=(N, stop - start))

