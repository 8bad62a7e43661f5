"""Incremental detokenisation: streamed pieces equal a full decode; stop strings cut exactly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import transformers
from splitfuse.core import detokenizer as detok_module
from splitfuse.core.detokenizer import IncrementalDetokenizer
from splitfuse.testing.tiny_model import BOS_ID, EOS_ID, VOCAB_SIZE, build_tokenizer

TOK = build_tokenizer()


def _byte_token_ids() -> dict[int, int]:
    """byte value -> id of the byte-level token holding just that byte (GPT-2's byte-to-char map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {b: TOK.convert_tokens_to_ids(c) for b, c in chars.items()}


BYTE = _byte_token_ids()
HIGH_BYTES = [BYTE[b] for b in range(0x80, 0x100)]  # continuation and lead bytes: partial characters


def stream(tokenizer, prompt, generated, stop=()):
    """Feed all tokens; return (detokenizer, pieces from add(), piece from flush())."""
    detok = IncrementalDetokenizer(tokenizer, prompt, stop)
    pieces = [detok.add(t) for t in generated]
    return detok, pieces, detok.flush()


def decode(ids):
    return TOK.decode(ids, skip_special_tokens=True)


token_ids = st.one_of(st.integers(0, VOCAB_SIZE - 1), st.sampled_from(HIGH_BYTES), st.sampled_from([BOS_ID, EOS_ID]))


@settings(max_examples=50, deadline=None)
@given(prompt=st.lists(token_ids, max_size=8), generated=st.lists(token_ids, max_size=40))
def test_random_streams_equal_full_decode(prompt, generated):
    detok = IncrementalDetokenizer(TOK, prompt)
    full = decode(generated)
    released = ""
    for k, token in enumerate(generated):
        released += detok.add(token)
        so_far = decode(generated[: k + 1])
        # Never ahead of the text (no partial character released early) ...
        assert full.startswith(released) and so_far.startswith(released)
        # ... and never behind once the text is complete.
        if not so_far.endswith("\ufffd"):
            assert released == so_far
    released += detok.flush()
    assert released == full == detok.text
    assert detok.stop_hit is None and detok.finished


def test_multibyte_characters_split_across_tokens():
    text = "naïve café 東京 😀 🦀🦓 ᚠᛇᚻ 𝔘𝔫𝔦"
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in TOK.decode([i]) for i in ids)  # the case under test really occurs
    detok, pieces, tail = stream(TOK, [BOS_ID], ids)
    assert "".join(pieces) + tail == text and tail == ""
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens released nothing: they ended mid-character


def test_bytes_one_token_at_a_time():
    ids = [BYTE[b] for b in "東京😀".encode()]
    detok, pieces, tail = stream(TOK, [BOS_ID], ids)
    assert pieces == ["", "", "東", "", "", "京", "", "", "", "😀"] and tail == ""


def test_prompt_ending_mid_character_does_not_glue_onto_output():
    prompt = TOK("abc", add_special_tokens=False)["input_ids"] + [BYTE[0xE6]]
    generated = [BYTE[0x9D], BYTE[0xB1], BYTE[ord("x")]]
    detok, pieces, tail = stream(TOK, prompt, generated)
    assert "".join(pieces) + tail == decode(generated) == "\ufffd\ufffdx"


def test_invalid_bytes_are_released_and_window_stays_bounded():
    calls = []

    class Recording:
        backend_tokenizer = None  # route every decode through the recorded method

        def __init__(self, tok):
            self.tok = tok

        def __len__(self):
            return len(self.tok)

        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return self.tok.decode(ids, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    # Lone lead bytes never complete; then a valid character and plain text.
    generated = [BYTE[0xE6]] * 50 + [BYTE[0xE6], BYTE[0x9D], BYTE[0xB1]] + TOK(" ok" * 200)["input_ids"][1:]
    detok, pieces, tail = stream(Recording(TOK), [BOS_ID], generated)
    assert "".join(pieces) + tail == decode(generated)
    assert max(calls) <= detok_module.CONTEXT_TOKENS + detok_module.MAX_HELD_TOKENS


def test_special_tokens_add_no_text():
    ids = TOK("Hi there", add_special_tokens=False)["input_ids"]
    generated = [ids[0], BOS_ID, EOS_ID, *ids[1:], EOS_ID]
    detok, pieces, tail = stream(TOK, [BOS_ID], generated)
    assert "".join(pieces) + tail == "Hi there"
    assert pieces[1] == pieces[2] == pieces[-1] == ""


def test_stop_string_spanning_tokens_truncates():
    ids = TOK("Hello world. STOP here", add_special_tokens=False)["input_ids"]
    stop_ids = TOK(" STOP", add_special_tokens=False)["input_ids"]
    assert len(stop_ids) > 1  # the stop string really spans tokens
    detok = IncrementalDetokenizer(TOK, [BOS_ID], stop=["STOP"])
    pieces = []
    for t in ids:
        pieces.append(detok.add(t))
        if detok.stop_hit:
            break
    assert detok.stop_hit == "STOP" and detok.finished
    assert "".join(pieces) == detok.text == "Hello world. "
    assert detok.add(ids[-1]) == "" and detok.flush() == ""  # tokens past a stop are dropped
    assert detok.text == "Hello world. "


def test_partial_stop_match_is_held_then_released():
    ids = TOK("the world is wide", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(TOK, [BOS_ID], stop=["world peace"])
    held = []
    for k, t in enumerate(ids):
        detok.add(t)
        so_far = decode(ids[: k + 1])
        # Held: the longest tail that might still become "world peace".
        keep = max((n for n in range(1, len("world peace")) if so_far.endswith("world peace"[:n])), default=0)
        assert detok.text == so_far[: len(so_far) - keep]
        held.append(so_far[len(so_far) - keep :])
    assert "world" in held and held[-1] == ""  # held back, then released when " is" broke the match
    assert detok.flush() == "" and detok.text == "the world is wide" and detok.stop_hit is None


def test_flush_releases_held_tail():
    ids = TOK("Hello wor", add_special_tokens=False)["input_ids"]
    detok, pieces, tail = stream(TOK, [BOS_ID], ids, stop="world")  # a single str is one stop string
    assert "".join(pieces) == "Hello " and tail == "wor"
    assert detok.text == "Hello wor" and detok.stop_hit is None and detok.finished
    with pytest.raises(RuntimeError, match="after flush"):
        detok.add(ids[0])


def test_earliest_stop_wins_and_flush_checks_stops():
    ids = TOK("one two three", add_special_tokens=False)["input_ids"]
    detok, pieces, tail = stream(TOK, [], ids, stop=["three", "two"])
    assert detok.stop_hit == "two" and detok.text == "one "
    # A stop string inside text still held at the end (here: behind a partial character) is honoured.
    generated = TOK("ab", add_special_tokens=False)["input_ids"] + [BYTE[0xE6]]
    detok, pieces, tail = stream(TOK, [], generated, stop=["b"])
    assert detok.stop_hit == "b" and detok.text == "a"


@settings(max_examples=50, deadline=None)
@given(
    text=st.text(alphabet="ab c.é東😀\n", max_size=30),
    stop=st.text(alphabet="ab c.é東😀\n", min_size=1, max_size=3),
)
def test_stop_strings_match_a_search_of_the_full_text(text, stop):
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    detok, pieces, tail = stream(TOK, [BOS_ID], ids, stop=[stop])
    cut = text.find(stop)
    assert detok.text == (text if cut < 0 else text[:cut])
    assert detok.stop_hit == (None if cut < 0 else stop)
    assert "".join(pieces) + tail == detok.text


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(TOK, [], stop=[""])
    detok = IncrementalDetokenizer(TOK, [])
    with pytest.raises(ValueError, match="non-negative"):
        detok.add(-1)
    with pytest.raises(TypeError):
        detok.add(1.5)


@pytest.fixture(scope="module")
def sentencepiece_tok():
    """A Llama-style tokenizer: Metaspace pieces, byte fallback, and a decoder that strips one leading space."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog."] * 4, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte tokens, as in Llama's vocabulary
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_keeps_the_leading_space_after_a_prompt(sentencepiece_tok):
    tok = sentencepiece_tok
    prompt = tok("Hello", add_special_tokens=False)["input_ids"]
    generated = tok(" world 東京 🦀 漢字漢字漢字漢字漢字漢字 fox", add_special_tokens=False)["input_ids"]
    assert len([t for t in tok.convert_ids_to_tokens(generated) if t.startswith("<0x")]) > 20  # long byte run
    detok, pieces, tail = stream(tok, prompt, generated)
    full = tok.decode(prompt + generated, skip_special_tokens=True)
    assert "".join(pieces) + tail == full[len(tok.decode(prompt)) :] == " world 東京 🦀 漢字漢字漢字漢字漢字漢字 fox"
    assert not any("\ufffd" in p for p in pieces)
    # Without a prompt it matches decode() of the generated ids alone, which strips that space.
    detok, pieces, tail = stream(tok, [], generated)
    assert "".join(pieces) + tail == tok.decode(generated) == "world 東京 🦀 漢字漢字漢字漢字漢字漢字 fox"


def test_sentencepiece_invalid_byte_group_matches_decode(sentencepiece_tok):
    tok = sentencepiece_tok
    byte = {b: tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    # ByteFallback judges a run of byte tokens as a whole: one bad byte turns all of it into "\ufffd".
    generated = tok(" hi", add_special_tokens=False)["input_ids"] + [byte[0x41], byte[0xE6], byte[0x42]]
    generated += tok(" fox", add_special_tokens=False)["input_ids"]
    detok, pieces, tail = stream(tok, [], generated)
    assert "".join(pieces) + tail == tok.decode(generated) == "hi��� fox"
