"""Weight tables: a model class declares which checkpoint tensor goes where; the name mapping and
the set of weights a checkpoint must hold are derived here from those tables.

A model's tables (class attributes of `CausalLM`): `global_weights`, `layer_prefix` +
`layer_weights`, `expert_blocks` + `expert_weights`, `skipped_weights`, `strip_prefixes`; each
maps a checkpoint name to our name or to a `Weight`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# How a tensor-parallel rank slices a checkpoint tensor (`Weight.split`; None: every rank holds it
# whole). See splitfuse/parallel/sharding.py.
COLUMN = "column"  # output features (dim 0) split evenly: q, gate, up
KV_COLUMN = "kv_column"  # dim 0 split by KV heads, a head replicated where there are fewer than ranks
ROW = "row"  # input features (dim 1) split evenly: o, down (their outputs are all-reduced)
VOCAB = "vocab"  # vocabulary rows (dim 0) split in ceil(V / ranks) ranges: embedding, lm_head
# matrices fused in the checkpoint, each part split on its own (a rank reads several ranges):
FUSED_QKV = "fused_qkv"  # rows [q | k | v]: q as COLUMN, k and v as KV_COLUMN (Phi-3, Falcon 7B)
GROUPED_QKV = "grouped_qkv"  # rows per KV head [its queries, k, v] (Falcon 40B and per-head Falcon)
GATE_UP = "gate_up"  # rows [gate | up], each half as COLUMN (Phi-3)
# every expert stacked in one tensor (transformers' in-memory layout): gate_up [E, 2I, H] and down
# [E, H, I], split along I like the per-expert tensors
STACKED_GATE_UP = "stacked_gate_up"
STACKED_DOWN = "stacked_down"


@dataclass(frozen=True)
class Weight:
    """Where one checkpoint tensor goes: our name, and when it is rows `part` of `parts` (>1) of a
    matrix fused at load time, and under which condition a checkpoint holds it."""

    name: str
    part: int = 0
    parts: int = 1
    # None: always. Else a model attribute that must be true ("not attr": false); an attribute that
    # is a method is called with the layer index, so a per-layer weight can depend on its layer.
    when: str | None = None
    split: str | None = None  # how tensor parallelism slices it: COLUMN, ROW, ... above (None: whole)


def fused(name: str, checkpoint_names: Iterable[str], when: str | None = None,
          splits: Sequence[str | None] | None = None) -> dict[str, Weight]:
    """{checkpoint name: Weight} for tensors concatenated in this order (along rows) into `name`;
    `splits` gives each part's tensor-parallel split (each rank fuses its own slices)."""
    names = list(checkpoint_names)
    splits = list(splits) if splits is not None else [None] * len(names)
    return {hf: Weight(name, i, len(names), when, split) for i, (hf, split) in enumerate(zip(names, splits))}


def weight_and_bias(modules: Mapping[str, str], when: str | None = None,
                    bias_when: str | None = None, split: str | None = None) -> dict[str, Weight]:
    """{checkpoint name: Weight} for `.weight` and `.bias` of each module (checkpoint -> our name);
    both held under `when`, the bias under `bias_when` where given. `split`: the weights' tensor-
    parallel split; a COLUMN bias is split alike, a ROW bias stays whole (see CausalLM.row_biases)."""
    bias_split = split if split in (COLUMN, KV_COLUMN, VOCAB) else None
    table = {}
    for hf, ours in modules.items():
        table[f"{hf}.weight"] = Weight(f"{ours}.weight", when=when, split=split)
        table[f"{hf}.bias"] = Weight(f"{ours}.bias", when=bias_when or when, split=bias_split)
    return table


def map_name(model, name: str) -> tuple[str | None, tuple[int, int] | None]:
    """Checkpoint name -> (our name or None to skip, (part, parts) of a fused matrix or None), by
    `model`'s tables; KeyError for a name they do not know."""
    for prefix in model.strip_prefixes:
        name = name.removeprefix(prefix)
    entry = _table_entry(model, name)
    if entry is not None:
        layer, weight = entry
        ours, part = _placed(weight)
        return (ours if layer is None else f"layers.{layer}.{ours}"), part
    expert = _layer_expert(model, name)
    if expert is not None:
        index, e, weight = expert
        part = (e * weight.parts + weight.part, model.num_experts * weight.parts)
        return f"layers.{index}.{weight.name}", part
    if name.endswith(model.skipped_weights):
        return None, None
    raise KeyError(name)


def split_of(model, name: str) -> str | None:
    """The tensor-parallel split of checkpoint tensor `name` by `model`'s tables (None: whole)."""
    for prefix in model.strip_prefixes:
        name = name.removeprefix(prefix)
    entry = _table_entry(model, name)
    if entry is not None:
        return entry[1].split
    expert = _layer_expert(model, name)
    return None if expert is None else expert[2].split


def _table_entry(model, name: str) -> tuple[str | None, Weight] | None:
    """(layer index or None, Weight) of a global or per-layer table entry for `name`, else None."""
    if name in model.global_weights:
        return None, _as_weight(model.global_weights[name])
    if name.startswith(model.layer_prefix):
        index, _, suffix = name[len(model.layer_prefix):].partition(".")
        if suffix in model.layer_weights:
            return index, _as_weight(model.layer_weights[suffix])
    return None


def expected_sources(model) -> dict[str, list[str]]:
    """Our name of every weight a checkpoint of `model`'s config holds -> the checkpoint names it is
    loaded from (after `strip_prefixes`; `<e>` for any expert)."""
    sources: dict[str, list[str]] = {}
    for hf, weight in model.global_weights.items():
        weight = _as_weight(weight)
        if _holds(model, weight.when):
            sources.setdefault(weight.name, []).append(hf)
    per_layer = [(suffix, _as_weight(w)) for suffix, w in model.layer_weights.items()]
    if model.expert_blocks:
        block = model.expert_blocks[0]
        per_layer += [(f"{block}.experts.<e>.{suffix}", w) for suffix, w in model.expert_weights.items()]
    for i in range(model.num_layers):
        for suffix, weight in per_layer:
            if _holds(model, weight.when, i):
                sources.setdefault(f"layers.{i}.{weight.name}", []).append(f"{model.layer_prefix}{i}.{suffix}")
    return sources


def _layer_expert(model, name: str) -> tuple[str, int, Weight] | None:
    """(layer index, expert index, its Weight) for a checkpoint name of one expert's tensor, else None."""
    if not name.startswith(model.layer_prefix):
        return None
    index, _, suffix = name[len(model.layer_prefix):].partition(".")
    expert = _expert_weight(model, suffix)
    return None if expert is None else (index, *expert)


def _expert_weight(model, suffix: str) -> tuple[int, Weight] | None:
    """(expert index, its Weight) for a layer suffix naming one expert's tensor, else None."""
    for block in model.expert_blocks:
        head = f"{block}.experts."
        if suffix.startswith(head):
            expert, _, rest = suffix[len(head):].partition(".")
            if expert.isdigit() and rest in model.expert_weights:
                return int(expert), model.expert_weights[rest]
    return None


def _holds(model, when: str | None, layer: int | None = None) -> bool:
    """Whether a table's condition is true for `model` (and layer)."""
    if when is None:
        return True
    attribute = when.removeprefix("not ")
    value = getattr(model, attribute)
    if callable(value):
        value = value(layer)
    return bool(value) != (attribute != when)


def _as_weight(entry: Weight | str) -> Weight:
    return entry if isinstance(entry, Weight) else Weight(entry)


def _placed(weight: Weight) -> tuple[str, tuple[int, int] | None]:
    return weight.name, ((weight.part, weight.parts) if weight.parts > 1 else None)
