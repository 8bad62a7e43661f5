"""What every model class shares: weight streaming with fused matrices, rotary tables, sizes.

A model keeps its weights in a flat dict on the backend's device and runs only backend ops, so
the same class serves every backend.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from splitfuse.backends.torch_ops import build_cos_sin_cache


class CausalLM:
    """Base of model classes; subclasses map HF weight names and implement forward/logits."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    # When a sequence reaches this many tokens its cached K/V are stale and the engine recomputes it
    # (Phi-3's longrope switches frequencies there); None: never.
    kv_stale_at_length: int | None = None

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        self.config = config
        self.backend = backend
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.weights: dict[str, torch.Tensor] = {}
        self._parts: dict[str, dict[int, torch.Tensor]] = {}

    def map_weight_name(self, name: str) -> tuple[str | None, tuple[int, int] | None]:
        """HF checkpoint name -> (our name or None to skip, (part, parts) of a fused matrix or None)."""
        raise NotImplementedError

    def expected_weights(self) -> set[str]:
        raise NotImplementedError

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
            incomplete = sorted(self._parts)
            raise ValueError(
                f"checkpoint is missing weights for {type(self).__name__}: {missing[:8] + incomplete[:8]}"
            )

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block takes across all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element

    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def rope_cos_sin(config, head_dim: int, max_positions: int, dtype: torch.dtype, device,
                 rotary_dim: int | None = None) -> torch.Tensor:
    """[max_positions, rotary_dim] cos|sin table built with transformers' own rope functions, so
    every rope scaling type it knows (llama3, linear, yarn, ...) gives HF's exact frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary_dim = rotary_dim or head_dim
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    cache = build_cos_sin_cache(inv_freq, max_positions, scaling)
    return cache.to(device=device, dtype=dtype)


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
