"""The tiny model factory: checkpoints load in transformers, the tokenizer is exact, the cache is reused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from splitfuse.testing import tiny_model
from splitfuse.testing.tiny_model import (
    BOS_ID,
    EOS_ID,
    VOCAB_SIZE,
    build_tokenizer,
    default_model_dir,
    make_tiny_model,
)

TEXTS = [
    "Hello, world!",
    "naïve café 東京 😀",
    "def f(x):\n    return x * 2\n",
    "  leading and trailing spaces  ",
    "Zebras 🦓 and 🦀 crabs; Ω≈ç√∫ — unseen: ᚠᛇᚻ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """One checkpoint per architecture, built once."""
    return {arch: make_tiny_model(tmp_path_factory.mktemp(arch), arch) for arch in tiny_model.ARCHITECTURES}


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def state_dict_of(path):
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("arch", sorted(tiny_model.ARCHITECTURES))
def test_loads_in_transformers_and_generates(models, arch):
    path = models[arch]
    model = load(path)
    assert type(model).__name__ == tiny_model.ARCHITECTURES[arch].model_cls
    assert (model.config.bos_token_id, model.config.eos_token_id) == (BOS_ID, EOS_ID)
    assert model.config.vocab_size == VOCAB_SIZE
    gen_config = transformers.GenerationConfig.from_pretrained(path)
    assert (gen_config.bos_token_id, gen_config.eos_token_id, gen_config.do_sample) == (BOS_ID, EOS_ID, False)

    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 8  # fewer only if it chose EOS
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


def test_weights_are_spread_and_every_parameter_matters(models):
    llama = state_dict_of(models["llama"])
    # 2-D weights scaled by init_scale (3 x HF's 0.02 init).
    assert llama["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(0.06, rel=0.15)
    # Norm weights perturbed around 1, so a forgotten norm weight changes the output.
    norm = llama["model.norm.weight"]
    assert not torch.all(norm == 1) and (norm - 1).abs().max() < 0.6
    # Qwen2's q/k/v biases exist and are non-zero.
    qwen = state_dict_of(models["qwen2"])
    for name in ("q_proj", "k_proj", "v_proj"):
        assert qwen[f"model.layers.0.self_attn.{name}.bias"].abs().sum() > 0


def test_same_seed_same_weights_other_seed_differs(tmp_path, models):
    again = state_dict_of(make_tiny_model(tmp_path / "again", "llama"))
    other = state_dict_of(make_tiny_model(tmp_path / "other", "llama", seed=1))
    first = state_dict_of(models["llama"])
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_sharded_save_loads_identically(tmp_path, models):
    path = make_tiny_model(tmp_path / "sharded", "llama", max_shard_size="40KB")
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 2
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    whole, sharded = state_dict_of(models["llama"]), state_dict_of(path)
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[k], sharded[k]) for k in whole)
    ids = torch.tensor([[BOS_ID, 40, 50, 60, 70]])
    with torch.no_grad():
        assert torch.equal(load(path)(ids).logits, load(models["llama"])(ids).logits)


def test_tied_embeddings_scaled_once_and_overrides_pass_through(tmp_path):
    path = make_tiny_model(
        tmp_path / "tied", "mistral", tie_word_embeddings=True, sliding_window=16, head_dim=32, dtype=torch.bfloat16
    )
    config = json.loads((path / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["sliding_window"], config["head_dim"]) == (True, 16, 32)
    tensors = state_dict_of(path)
    assert "lm_head.weight" not in tensors  # tied: saved once
    embed = tensors["model.embed_tokens.weight"]
    assert embed.dtype == torch.bfloat16
    assert embed.float().std().item() == pytest.approx(0.06, rel=0.15)  # x3, not x9
    model = load(path)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model(tmp_path, "gpt9")
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_tiny_model(tmp_path, num_heads=4, num_kv_heads=3)


def test_tokenizer_layout():
    tok = build_tokenizer()
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, 0)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert build_tokenizer().get_vocab() == tok.get_vocab()  # deterministic, and copies are independent
    # Some learned token ends inside a multi-byte character (the detokenizer must cope with that).
    decoded = [tok.decode([i]) for i in range(3, VOCAB_SIZE)]
    assert sum("\ufffd" in d and len(d) > 1 for d in decoded) > 0
    assert sum(any(ord(c) > 127 and c != "\ufffd" for c in d) for d in decoded) > 10


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_and_adds_bos(text):
    tok = build_tokenizer()
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:] and EOS_ID not in ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]


def test_saved_tokenizer_matches(models):
    saved = transformers.AutoTokenizer.from_pretrained(models["llama"])
    tok = build_tokenizer()
    for text in TEXTS:
        assert saved(text)["input_ids"] == tok(text)["input_ids"]
    assert (saved.bos_token_id, saved.eos_token_id) == (BOS_ID, EOS_ID)
    chat = [{"role": "user", "content": "Hi café"}]
    rendered = saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|user|>\nHi café</s>\n<|assistant|>\n"
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == rendered


def test_default_model_built_once_under_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITFUSE_CACHE_DIR", str(tmp_path))
    path = default_model_dir()
    assert path.parent == tmp_path and tiny_model.DEFAULT_MODEL_VERSION in path.name
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["max_position_embeddings"]) == (4, 256, 2048)
    mtime = (path / "config.json").stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny_model, "make_tiny_model", must_not_build)
    assert default_model_dir() == path
    assert (path / "config.json").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind


def test_default_model_lost_race_uses_the_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITFUSE_CACHE_DIR", str(tmp_path))
    final = tmp_path / f"tiny-llama-{tiny_model.DEFAULT_MODEL_VERSION}"

    def slow_build(path, **kwargs):
        # Another process finishes first, while this one is still writing.
        final.mkdir()
        (final / "config.json").write_text("{}")
        (final / "winner").touch()
        (path / "config.json").write_text("{}")
        return path

    monkeypatch.setattr(tiny_model, "make_tiny_model", slow_build)
    assert default_model_dir() == final
    assert (final / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
