"""What every model class shares: weight tables and streaming with fused matrices, sizes, the hooks
the engine asks a model about.

A model keeps its weights in a flat dict on the backend's device under its own names, and runs only
backend ops, so the same class serves every backend. Its class tables say which checkpoint tensor
goes where; `map_weight_name` and `expected_weights` are derived from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from splitfuse.models import weight_tables
from splitfuse.models.weight_tables import Weight
from splitfuse.parallel.shard import SINGLE, Shard
from splitfuse.parallel.sharding import Slices, checkpoint_slice


class CausalLM:
    """Base of model classes: subclasses declare weight tables and implement forward/logits.

    Weight tables (checkpoint name -> `Weight` or just our name), from which `map_weight_name` and
    `expected_weights` are derived; a subclass may override either method instead.
    """

    # names outside the layers, as the checkpoint spells them (after `strip_prefixes`)
    global_weights: Mapping[str, Weight | str] = {}
    # per layer: "<layer_prefix><index>.<suffix>" -> "layers.<index>.<our name>"
    layer_prefix = "model.layers."
    layer_weights: Mapping[str, Weight | str] = {}
    # per expert of a mixture-of-experts layer: "<block>.experts.<e>.<suffix>" for each block in
    # expert_blocks; Weight(name, slot, slots_per_expert) is rows slot of expert e's slots_per_expert
    # in a matrix stacking every expert (the model's `num_experts`)
    expert_blocks: tuple[str, ...] = ()
    expert_weights: Mapping[str, Weight] = {}
    # checkpoint names ending so are not weights (buffers recomputed from the config)
    skipped_weights: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # prefixes some checkpoints put before every name, removed in this order before the lookup
    strip_prefixes: tuple[str, ...] = ()

    # Whether forward honours a Shard (tensor parallelism). Read from each class itself, never
    # inherited: a subclass adds layers its parent's sharding may not cover, so it must say so anew.
    supports_tensor_parallel: bool = False
    shard: Shard = SINGLE
    # our names ending so are biases of ROW-split matrices: every rank's partial output would add
    # them before the all-reduce sums the ranks, so only rank 0 keeps them
    row_biases: tuple[str, ...] = ()

    num_layers: int
    num_kv_heads: int  # this rank's
    total_kv_heads: int  # the checkpoint's
    head_dim: int

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        self.config = config
        self.backend = backend
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.weights: dict[str, torch.Tensor] = {}
        self._parts: dict[str, dict[int, torch.Tensor]] = {}

    @property
    def position_limit(self) -> int:
        """The most positions the model was trained for: max_model_len can be raised up to it."""
        return getattr(self.config, "max_position_embeddings", None) or self.max_model_len

    # ---- hooks the engine calls ----------------------------------------------------------------
    def recompute_kv_at_length(self) -> int | None:
        """A sequence reaching this many tokens has its cached K/V recomputed; None: never.

        For models whose K/V depend on the sequence's length, not only on each token's position
        (Phi-3's longrope switches rotary frequencies past the original context)."""
        return None

    # ---- tensor parallelism --------------------------------------------------------------------
    def set_shard(self, shard: Shard) -> None:
        """Make this model rank `shard.rank` of `shard.size` before its weights load; a model that
        cannot be split refuses with the reason."""
        if shard.size > 1 and not vars(type(self)).get("supports_tensor_parallel", False):
            raise ValueError(f"tensor_parallel_size={shard.size}: {type(self).__name__} does not support tensor "
                             "parallelism (its class does not declare supports_tensor_parallel); use "
                             "tensor_parallel_size=1")
        self.shard = shard

    def checkpoint_slice(self, name: str, shape: list[int]) -> Slices | None:
        """This rank's slices of checkpoint tensor `name` of `shape`, by the tables' splits; None:
        load it whole. Reads `total_kv_heads` and `head_dim` (the checkpoint's)."""
        return checkpoint_slice(weight_tables.split_of(self, name), shape, self.shard, self.total_kv_heads,
                                self.head_dim)

    # ---- weights -------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> tuple[str | None, tuple[int, int] | None]:
        """Checkpoint name -> (our name or None to skip, (part, parts) of a fused matrix or None);
        KeyError for a name the tables do not know."""
        return weight_tables.map_name(self, name)

    def expected_weights(self) -> set[str]:
        """Our names of every weight `forward` reads from a checkpoint of this config."""
        return set(weight_tables.expected_sources(self))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream (name, tensor) pairs in; fused matrices are concatenated once all parts arrived."""
        device = self.backend.device
        for name, tensor in named_tensors:
            try:
                ours, part = self.map_weight_name(name)
            except KeyError:
                raise ValueError(f"checkpoint has an unexpected weight {name!r} for {type(self).__name__}") from None
            if ours is None:
                continue
            tensor = tensor.to(device=device, dtype=self.dtype)
            if part is None:
                self.weights[ours] = tensor
                continue
            index, count = part
            parts = self._parts.setdefault(ours, {})
            parts[index] = tensor
            if len(parts) == count:
                self.weights[ours] = torch.cat([parts[i] for i in range(count)], dim=0)
                del self._parts[ours]
        missing = sorted(self.expected_weights() - set(self.weights))
        if missing or self._parts:
            raise ValueError(f"checkpoint is missing weights for {type(self).__name__}: "
                             f"{list(self._describe_missing(missing[:8] + sorted(self._parts)[:8]))}")
        if self.shard.rank > 0 and self.row_biases:
            for name in [n for n in self.weights if n.endswith(self.row_biases)]:
                del self.weights[name]

    def _describe_missing(self, names: list[str]) -> Iterator[str]:
        """Each missing name, with the checkpoint names it is loaded from where the tables know them."""
        sources = weight_tables.expected_sources(self) if self.global_weights or self.layer_weights else {}
        for name in names:
            known = sources.get(name)
            yield f"{name} (from {' or '.join(known)})" if known else name

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block takes across all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element

    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def add_norm(norm, name: str, x: torch.Tensor, residual: torch.Tensor | None):
    """The pre-norm step: (norm `name` of x + residual, the sum: the next residual). `norm(name, x,
    residual=None)` returns the normed tensor alone, or (normed, sum); the first layer has no residual."""
    if residual is None:
        return norm(name, x), x
    return norm(name, x, residual)


# HF activation names (ACT2FN keys) -> gelu's `approximate`; the tanh forms differ in rounding only
_GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def activation_op(backend, name: str, field: str):
    """The backend op running HF activation `name` (read from config field `field`) on a tensor."""
    if name == "relu":
        return backend.relu
    if name in _GELU_APPROXIMATE:
        approximate = _GELU_APPROXIMATE[name]
        return lambda x: backend.gelu(x, approximate)
    raise ValueError(f"config field {field}={name!r} is not supported; expected one of "
                     f"{sorted(['relu', *_GELU_APPROXIMATE])}")
