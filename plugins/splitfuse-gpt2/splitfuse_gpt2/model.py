"""GPT-2 (Hugging Face `GPT2LMHeadModel`) written against splitfuse backend ops only.

What GPT-2 does differently from Llama, and where this file handles it:
- learned position embeddings (`wpe`) added to the token embeddings instead of rotary: forward();
- LayerNorm with a bias instead of RMSNorm, and a plain GELU MLP (tanh approximation,
  "gelu_new") instead of a gated one: forward();
- Conv1D layers, whose weights are stored [in, out], the transpose of nn.Linear's [out, in]:
  transposed once while loading, in load_weights();
- q, k and v already fused in one matrix (`c_attn`), so nothing to concatenate;
- a bias on every projection, and an LM head tied to the token embeddings: logits().
"""

from __future__ import annotations

import torch

from splitfuse.models.base import CausalLM

# config.activation_function -> the `approximate` argument of the gelu op
GELU_APPROXIMATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
LAYER_WEIGHTS = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config, backend, dtype: torch.dtype, max_model_len: int) -> None:
        super().__init__(config, backend, dtype, max_model_len)
        if config.activation_function not in GELU_APPROXIMATIONS:
            raise ValueError(f"GPT-2 config activation_function {config.activation_function!r} is not supported; "
                             f"expected one of {sorted(GELU_APPROXIMATIONS)}")
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 config add_cross_attention=True (an encoder-decoder) is not supported")
        self.num_layers = config.n_layer
        self.num_heads = self.num_kv_heads = config.n_head  # no GQA: every head has its own K/V
        self.head_dim = config.n_embd // config.n_head
        self.eps = config.layer_norm_epsilon
        self.gelu_approximate = GELU_APPROXIMATIONS[config.activation_function]
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        # some GPT-2 variants also divide layer i's scores by i + 1
        by_layer = getattr(config, "scale_attn_by_inverse_layer_idx", False)
        self.scales = [scale / (i + 1) if by_layer else scale for i in range(self.num_layers)]

    # ---- weights ---------------------------------------------------------------------------
    def map_weight_name(self, name: str):
        name = name.removeprefix("transformer.")  # the original OpenAI checkpoints have no prefix
        if name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            return name, None
        if name == "lm_head.weight":
            return (None if self.tie_word_embeddings else name), None
        if name.startswith("h."):
            _, index, suffix = name.split(".", 2)
            if suffix in ("attn.bias", "attn.masked_bias"):
                return None, None  # causal-mask buffers of older checkpoints, not weights
            if suffix in LAYER_WEIGHTS:
                return f"layers.{index}.{suffix}", None
        raise KeyError(name)

    def load_weights(self, named_tensors) -> None:
        # Conv1D keeps [in, out]; backend.linear wants nn.Linear's [out, in].
        super().load_weights(
            (name, tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor)
            for name, tensor in named_tensors
        )

    def expected_weights(self) -> set[str]:
        names = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
        if not self.tie_word_embeddings:
            names.add("lm_head.weight")
        return names | {f"layers.{i}.{n}" for i in range(self.num_layers) for n in LAYER_WEIGHTS}

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids, positions, meta, kv_cache) -> torch.Tensor:
        ops, w = self.backend, self.weights
        num_tokens = input_ids.shape[0]
        hidden = ops.embedding(input_ids, w["wte.weight"]) + ops.embedding(positions, w["wpe.weight"])
        for i in range(self.num_layers):
            p = f"layers.{i}."
            x = ops.layer_norm(hidden, w[p + "ln_1.weight"], w[p + "ln_1.bias"], self.eps)
            qkv = ops.linear(x, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
            # q, k, v: [T, H, D] views of the fused projection
            q, k, v = (t.view(num_tokens, self.num_heads, self.head_dim) for t in qkv.split(self.hidden_size, -1))
            attn = ops.attention(q, k, v, kv_cache[i], meta, self.scales[i])
            hidden = hidden + ops.linear(attn.reshape(num_tokens, -1), w[p + "attn.c_proj.weight"],
                                         w[p + "attn.c_proj.bias"])
            x = ops.layer_norm(hidden, w[p + "ln_2.weight"], w[p + "ln_2.bias"], self.eps)
            x = ops.gelu(ops.linear(x, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]), self.gelu_approximate)
            hidden = hidden + ops.linear(x, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        return ops.layer_norm(hidden, w["ln_f.weight"], w["ln_f.bias"], self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.weights["wte.weight"] if self.tie_word_embeddings else self.weights["lm_head.weight"]
        return self.backend.linear(hidden, head)
