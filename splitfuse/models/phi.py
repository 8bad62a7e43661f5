"""Phi-2, and the LayerNorm decoder it shares with Falcon: rotary attention (possibly on part of
each head) and a plain MLP, run in parallel from one normed input or one after the other.

Weights live under our own names, so each architecture only maps its checkpoint names:
embed, final_norm, lm_head and per layer attn_norm, mlp_norm, qkv, o, up, down, q_norm, k_norm
(each `.weight`, most with `.bias`).
"""

from __future__ import annotations

import torch

from splitfuse.models.base import CausalLM, activation_op, rope_cos_sin


class LayerNormDecoderLM(CausalLM):
    """Rotary-attention decoder of LayerNorm blocks; subclasses read their config and map names."""

    # HF name -> ours for names outside the layers; HF layer suffix -> ours, or (ours, part, parts)
    # for a piece of a matrix fused at load time
    _TOP: dict[str, str] = {}
    _LAYER: dict[str, str | tuple[str, int, int]] = {}
    _LAYER_PREFIX = "model.layers."

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int, *, num_kv_heads: int,
                 eps: float, activation: str, activation_field: str, parallel: bool, mlp_norm: bool,
                 has_bias: bool, rotary_dim: int | None = None, qk_norm: bool = False,
                 lm_head_bias: bool = False) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_layers = config.num_hidden_layers
        self.eps = eps
        self.scale = self.head_dim ** -0.5
        self.act = activation_op(backend, activation, activation_field)
        self.parallel = parallel  # attention and MLP both read the layer's input
        self.mlp_norm = mlp_norm  # the MLP has its own LayerNorm (after attention, or beside it)
        self.has_bias = has_bias
        self.qk_norm = qk_norm  # per-head LayerNorm of q and k before the rotary
        self.lm_head_bias = lm_head_bias
        self.rotary_dim = rotary_dim if rotary_dim and rotary_dim < self.head_dim else None
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.cos_sin = rope_cos_sin(config, self.head_dim, max_model_len, dtype, backend.device,
                                    rotary_dim=self.rotary_dim)
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = (q, kv, kv)

    # ---- weights ---------------------------------------------------------------------------
    def map_weight_name(self, name: str):
        if name in self._TOP:
            return self._TOP[name], None
        if name.startswith(self._LAYER_PREFIX):
            index, suffix = name[len(self._LAYER_PREFIX):].split(".", 1)
            ours = self._LAYER[suffix]
            if isinstance(ours, tuple):
                fused, part, parts = ours
                return f"layers.{index}.{fused}", (part, parts)
            return f"layers.{index}.{ours}", None
        if name.endswith("rotary_emb.inv_freq"):
            return None, None  # recomputed from the config
        raise KeyError(name)

    def expected_weights(self) -> set[str]:
        names = {"embed.weight", "final_norm.weight", "final_norm.bias"}
        if not self.tie_word_embeddings:
            names.add("lm_head.weight")
        if self.lm_head_bias:
            names.add("lm_head.bias")
        layer = ["attn_norm.weight", "attn_norm.bias", "qkv.weight", "o.weight", "up.weight", "down.weight"]
        if self.has_bias:
            layer += ["qkv.bias", "o.bias", "up.bias", "down.bias"]
        if self.mlp_norm:
            layer += ["mlp_norm.weight", "mlp_norm.bias"]
        if self.qk_norm:
            layer += ["q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"]
        return names | {f"layers.{i}.{n}" for i in range(self.num_layers) for n in layer}

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        hidden = self.backend.embedding(input_ids, self.weights["embed.weight"])
        residual = None
        for i in range(self.num_layers):
            p = f"layers.{i}."
            x, residual = self._norm(p + "attn_norm", hidden, residual)
            attn = self._attention(p, x, positions, meta, kv_cache[i])
            if self.parallel:
                # HF adds attention and MLP outputs first, then the residual (in the next norm)
                mlp_in = self._norm(p + "mlp_norm", residual)[0] if self.mlp_norm else x
                hidden = attn + self._mlp(p, mlp_in)
            else:
                x, residual = self._norm(p + "mlp_norm", attn, residual)
                hidden = self._mlp(p, x)
        hidden, _ = self._norm("final_norm", hidden, residual)
        return hidden

    def _norm(self, name: str, x: torch.Tensor, residual: torch.Tensor | None = None):
        """LayerNorm `name` of x (+ residual): (normed, the sum, which is the next residual)."""
        w = self.weights
        if residual is None:
            return self.backend.layer_norm(x, w.get(name + ".weight"), w.get(name + ".bias"), self.eps), x
        return self.backend.layer_norm(x, w.get(name + ".weight"), w.get(name + ".bias"), self.eps, residual)

    def _attention(self, p: str, x: torch.Tensor, positions, meta, kv_layer) -> torch.Tensor:
        ops, w = self.backend, self.weights
        T = x.shape[0]
        q, k, v = ops.linear(x, w[p + "qkv.weight"], w.get(p + "qkv.bias")).split(self.qkv_sizes, dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = ops.layer_norm(q, w[p + "q_norm.weight"], w[p + "q_norm.bias"], self.eps)
            k = ops.layer_norm(k, w[p + "k_norm.weight"], w[p + "k_norm.bias"], self.eps)
        attn = ops.rotary_attention(q, k, v, positions, self.cos_sin, kv_layer, meta, self.scale,
                                    rotary_dim=self.rotary_dim)
        return ops.linear(attn.reshape(T, -1), w[p + "o.weight"], w.get(p + "o.bias"))

    def _mlp(self, p: str, x: torch.Tensor) -> torch.Tensor:
        ops, w = self.backend, self.weights
        up = self.act(ops.linear(x, w[p + "up.weight"], w.get(p + "up.bias")))
        return ops.linear(up, w[p + "down.weight"], w.get(p + "down.bias"))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.weights
        head = w["embed.weight"] if self.tie_word_embeddings else w["lm_head.weight"]
        return self.backend.linear(hidden, head, w.get("lm_head.bias"))


def weight_and_bias(names: dict[str, str]) -> dict[str, str]:
    """{hf: ours} for `.weight` and `.bias` of each module."""
    return {f"{hf}.{kind}": f"{ours}.{kind}" for hf, ours in names.items() for kind in ("weight", "bias")}


class PhiForCausalLM(LayerNormDecoderLM):
    """Phi-2: partial rotary, attention and MLP in parallel from one LayerNorm, biases everywhere,
    lm_head with a bias, optional per-head LayerNorm of q and k."""

    _TOP = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "lm_head.weight",
            "lm_head.bias": "lm_head.bias", **weight_and_bias({"model.final_layernorm": "final_norm"})}
    _LAYER = {
        **{f"self_attn.{n}_proj.{kind}": (f"qkv.{kind}", i, 3)
           for i, n in enumerate("qkv") for kind in ("weight", "bias")},
        **weight_and_bias({"self_attn.dense": "o", "mlp.fc1": "up", "mlp.fc2": "down", "input_layernorm": "attn_norm",
                      "self_attn.q_layernorm": "q_norm", "self_attn.k_layernorm": "k_norm"}),
    }

    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        head_dim = config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        super().__init__(
            config, backend, dtype, max_model_len,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            eps=config.layer_norm_eps, activation=config.hidden_act, activation_field="hidden_act",
            parallel=True, mlp_norm=False, has_bias=True, rotary_dim=int(head_dim * factor),
            qk_norm=bool(getattr(config, "qk_layernorm", False)), lm_head_bias=True,
        )
