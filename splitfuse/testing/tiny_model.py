"""Tiny, locally built models and a tokenizer, for tests and for running with no model argument.

Nothing here touches the network: the tokenizer is trained on an embedded corpus and the
weights are random (seeded), so every model is reproducible from its arguments.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import tempfile
from typing import NamedTuple

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Stable special-token ids (Llama's layout); the engine may rely on these.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = UNK_ID  # byte-level BPE never emits <unk>, so it doubles as padding
VOCAB_SIZE = 512

# Renders a conversation; the template writes BOS itself (as Llama's does), so encode its
# output with add_special_tokens=False to avoid a second BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Varied on purpose: prose, code and multi-byte text, so merges cover spaces, indentation and
# 2-, 3- and 4-byte UTF-8 characters (a token may then hold part of a character).
_CORPUS = r'''
The quick brown fox jumps over the lazy dog. The dog did not mind; it was asleep in the sun.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning he rowed out past the rocks, and every evening he came back with his nets full.
"Where do you find so many fish?" asked the children. "Patience," he said, "and an early start."
Language models predict the next token given the previous ones. A serving engine batches many
requests together, splits long prompts into chunks, and keeps a paged cache of keys and values
so that no memory is wasted. Throughput rises when the batch is full; latency stays low when
each forward pass has a fixed budget of tokens. This is the idea behind dynamic split-fuse.
She said: "It's 3:45 pm, isn't it? We're late!" He replied, 'No, we aren't - it's only 3:40.'
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 512 1024 2048 3.14159 2.71828 -1 +1 1e-5 50% $20.
Lists, too: apples, oranges, pears; red, green, blue. Questions? Answers! (Parentheses) [brackets] {braces}.

def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value


if __name__ == "__main__":
    for i in range(10):
        print(i, fibonacci(i))
    counts = {"a": 1, "b": 2}
    items = [x * 2 for x in counts.values() if x > 0]
    import os, sys
    path = os.path.join("data", "file.txt")
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    try:
        result = int(text.strip())
    except ValueError as exc:
        raise RuntimeError(f"bad input: {exc!r}") from None

Un café, s'il vous plaît. C'est un naïve garçon à l'école; élève, été, déjà, où, ça.
Ein schönes Mädchen aß Müsli über die Straße. Grüße aus München!
El niño comió una manzana en España; ¿dónde está el baño? ¡Olé!
Привет, мир! Как дела? Москва — столица России.
東京は日本の首都です。東京タワーと富士山。私は日本語を勉強しています。
北京是中国的首都。你好，世界！我们学习中文。
안녕하세요 세계. 서울은 한국의 수도입니다.
Emoji: 😀 😃 😄 😁 🎉 🚀 ❤️ 👍 🐍 ✨ — naïve café 東京 😀 naïve café 東京 😀
Math: α + β = γ, ∑ x² ≤ ∞, π ≈ 3.14, √2, ∀x ∃y, → ← ↑ ↓, ° € £ ¥ © ®.
'''


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; the JSON is the cache, copies are cheap."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # add_prefix_space=False: decode(encode(s)) == s exactly; use_regex splits words like GPT-2.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Llama-style: BOS before a single sequence (and before each of a pair), no EOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    ids = [tok.token_to_id(t) for t in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)]
    if ids != [UNK_ID, BOS_ID, EOS_ID] or tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer training drifted: special ids {ids}, vocab {tok.get_vocab_size()}")
    return tok.to_str()


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A fresh copy of the tiny byte-level BPE tokenizer (512 tokens; <unk>=0, <s>=1, </s>=2)."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # keep decode exact, as byte-level needs no clean-up
        model_max_length=2048,
    )


def _save_tokenizer(path: pathlib.Path) -> None:
    build_tokenizer().save_pretrained(path)
    # transformers 5 records its class as "TokenizersBackend"; the v4 name loads in both.
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class _Arch(NamedTuple):
    config_cls: str  # names in `transformers`, resolved on use: importing every model costs seconds
    model_cls: str


# Supported architectures; to add one, map its name to its config and causal-LM class names.
ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _Arch("MistralConfig", "MistralForCausalLM"),
    "qwen2": _Arch("Qwen2Config", "Qwen2ForCausalLM"),
    "mixtral": _Arch("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": _Arch("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3": _Arch("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": _Arch("Phi3Config", "Phi3ForCausalLM"),
    "phi": _Arch("PhiConfig", "PhiForCausalLM"),
    "falcon": _Arch("FalconConfig", "FalconForCausalLM"),
    "opt": _Arch("OPTConfig", "OPTForCausalLM"),
    "gemma2": _Arch("Gemma2Config", "Gemma2ForCausalLM"),
}

# Config values that keep a tiny model tiny where the config class's defaults are full-size
# (expert counts and widths, head size); make_tiny_model's keyword arguments override them.
TINY_DEFAULTS: dict[str, dict] = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "qwen3": {"head_dim": 16},
    "phi": {"initializer_range": 0.1},  # at 0.02 its greedy output is nearly one token
    "falcon": {"ffn_hidden_size": 128, "initializer_range": 0.1},
    "opt": {"ffn_dim": 128, "init_std": 0.1},  # at 0.02 its greedy output is one token
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16},
}


def resolve_arch(name: str) -> str:
    """The ARCHITECTURES key for `name`: a key, or a Hugging Face causal-LM class name such as
    "LlamaForCausalLM"; any other class transformers has (e.g. "GPT2LMHeadModel") is added."""
    if name in ARCHITECTURES:
        return name
    for key, entry in ARCHITECTURES.items():
        if entry.model_cls == name:
            return key
    try:
        config_cls = getattr(transformers, name).config_class
    except Exception:  # not a transformers model class (or one that cannot be imported here)
        raise ValueError(f"unknown arch {name!r}; choose one of {sorted(ARCHITECTURES)} or a Hugging Face "
                         "causal-LM class name from transformers") from None
    ARCHITECTURES[name] = _Arch(config_cls.__name__, name)
    return name


@torch.no_grad()
def _rescale_(model: torch.nn.Module, init_scale: float, seed: int) -> None:
    """Spread the weights so logits are well separated and every parameter matters."""
    gen = torch.Generator().manual_seed(seed + 1)
    seen: set[int] = set()  # tied weights share storage: scale them once
    for name, param in model.named_parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        if param.dim() >= 2:
            param.mul_(init_scale)
        elif name.endswith("bias"):
            # HF zeroes biases at init, which would hide a missing bias add.
            param.copy_(0.1 * init_scale * torch.randn(param.shape, generator=gen))
        else:
            # Norm weights start at 1; perturb them so a skipped norm weight changes the output.
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))


def make_tiny_model(
    path: str | os.PathLike,
    arch: str = "llama",
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = VOCAB_SIZE,
    max_position_embeddings: int = 512,
    seed: int = 0,
    init_scale: float = 3.0,
    max_shard_size: int | str | None = None,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    **config_overrides,
) -> pathlib.Path:
    """Save a random HF checkpoint (safetensors, tokenizer, generation config) to `path`; return it.

    `config_overrides` go straight to the config class (e.g. rope_parameters, sliding_window, head_dim).
    """
    arch = resolve_arch(arch)
    if vocab_size < VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least the tokenizer's {VOCAB_SIZE}, got {vocab_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    config_cls, model_cls = (getattr(transformers, name) for name in ARCHITECTURES[arch])
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=tie_word_embeddings,
        **{**TINY_DEFAULTS.get(arch, {}), **config_overrides},
    )
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG alone
        torch.manual_seed(seed)
        model = model_cls(config)
    _rescale_(model, init_scale, seed)
    model.to(dtype)
    model.config.dtype = dtype  # recorded as torch_dtype/dtype so loaders pick the saved precision

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **save_kwargs)
    _save_tokenizer(path)
    transformers.GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    ).save_pretrained(path)
    return path


def tiny_model_builder(tmp_path_factory, variants: dict[str, tuple[str, dict]]):
    """A function name -> directory of tiny model `variants[name]` = (arch, make_tiny_model keyword
    arguments), each built on first use in a fresh directory of pytest's `tmp_path_factory`."""
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            arch, overrides = variants[name]
            built[name] = str(make_tiny_model(tmp_path_factory.mktemp(name), arch, **overrides))
        return built[name]

    return get


# Bump when the recipe below (or the tokenizer/corpus) changes, so stale caches are not reused.
DEFAULT_MODEL_VERSION = "v1"
DEFAULT_MODEL_KWARGS = dict(
    arch="llama",
    num_layers=4,
    hidden_size=256,
    num_heads=8,
    num_kv_heads=4,
    intermediate_size=512,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=2048,
    seed=0,
)


def cache_dir() -> pathlib.Path:
    """Where splitfuse caches built artefacts: $SPLITFUSE_CACHE_DIR or ~/.cache/splitfuse."""
    env = os.environ.get("SPLITFUSE_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "splitfuse"


def default_model_dir() -> pathlib.Path:
    """The tiny Llama used when no model is named; built on first use, then reused."""
    final = cache_dir() / f"tiny-llama-{DEFAULT_MODEL_VERSION}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place, so readers never see a half-written model.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        make_tiny_model(tmp, **DEFAULT_MODEL_KWARGS)
        (tmp / "splitfuse_recipe.json").write_text(
            json.dumps({"version": DEFAULT_MODEL_VERSION, **DEFAULT_MODEL_KWARGS}, indent=2)
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise  # not a lost race: a real failure
            # Another process finished first; its model is identical, so use it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
