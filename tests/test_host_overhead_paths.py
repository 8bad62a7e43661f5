"""The short cuts a step takes on its host work give what the long way gives."""

from __future__ import annotations

import pytest

from splitfuse.assembly import build_engine
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.core.detokenizer import IncrementalDetokenizer
from splitfuse.testing.tiny_model import BOS_ID, build_tokenizer

TOK = build_tokenizer()


def _outputs(engine) -> dict[str, tuple[list[int], str]]:
    seen: dict[str, tuple[list[int], str]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            ids, text = seen.get(out.request_id, ([], ""))
            seen[out.request_id] = (ids + out.new_token_ids, text + out.new_text)
    return seen


def test_decode_only_steps_sample_the_same_tokens_as_gathering_the_sampled_rows(tiny_model_dir, monkeypatch):
    def run(always_gather: bool):
        engine = build_engine(tiny_model_dir("llama"), "cpu",
                              EngineConfig(num_kv_blocks=64, kv_block_size=4, token_budget=16))
        fed = []
        if always_gather:  # the rows picked by index even where every row is sampled
            logits = engine.model.logits
            engine.model.logits = lambda hidden: logits(hidden.clone())
        else:
            logits = engine.model.logits
            engine.model.logits = lambda hidden: fed.append(hidden) or logits(hidden)
        params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
        for prompt in ([BOS_ID, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53], [BOS_ID, 7], [BOS_ID, 8, 11]):
            engine.add_request(prompt, params)  # the long prompt runs in chunks next to the others' decodes
        return _outputs(engine), fed

    gathered, _ = run(always_gather=True)
    direct, fed = run(always_gather=False)
    assert direct == gathered
    assert any(h.shape[0] == 3 for h in fed)  # decode-only steps went through the short cut


@pytest.mark.parametrize("stop, pieces, released, hit", [
    # the held suffix is the longest one that begins some stop string, whichever it is
    (["xyz", "abc"], ["hello", " ab"], "hello ", None),
    (["xyz", "abc"], ["hello", " ab", "c"], "hello ", "abc"),
    (["xyz", "abc"], ["hello", " x", "yq"], "hello xyq", None),
    (["xyz", "abc"], ["hello", " xy", "z"], "hello ", "xyz"),
])
def test_text_that_may_begin_one_of_several_stop_strings_is_held(stop, pieces, released, hit):
    detok = IncrementalDetokenizer(TOK, [BOS_ID], stop)
    streamed = ""
    for piece in pieces:
        for token in TOK(piece, add_special_tokens=False)["input_ids"]:
            streamed += detok.add(token)
    assert streamed == released and detok.stop_hit == hit


def test_without_stop_strings_every_piece_is_released_as_it_decodes():
    ids = TOK("the world is wide", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(TOK, [BOS_ID])
    pieces = [detok.add(t) for t in ids]
    assert all(pieces) and "".join(pieces) + detok.flush() == TOK.decode(ids, skip_special_tokens=True)
