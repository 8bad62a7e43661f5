"""Constrained decoding: every sampled output obeys its schema, regex, choice list or grammar, and
unconstrained requests in the same batch are untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

import splitfuse
from splitfuse.config import SamplingParams, StructuredOutputsParams
from splitfuse.core.constraints import Constraints, apply_token_bitmask
from splitfuse.core.engine import AdmissionError

# Nested objects, an array, enums and required fields; bounded so a random model finishes it.
PERSON = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "home": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{2}$"}},
                 "required": ["zip"]},
    },
    "required": ["id", "role", "tags", "home"],
}
PHONE = r"\(\d{3}\) \d{2}-\d{2}"


@pytest.fixture(scope="module")
def pipe():
    with splitfuse.pipeline(None, "cpu", dtype="float32") as p:
        yield p


def constrained(**spec) -> dict:
    return {"structured_outputs": StructuredOutputsParams(**spec)}


def test_a_hundred_sampled_outputs_all_validate_against_the_json_schema(pipe):
    responses = pipe(["A user record:"] * 100, temperature=1.0, max_new_tokens=80, **constrained(json=PERSON))
    for response in responses:
        assert response.finish_reason == "stop"
        jsonschema.validate(json.loads(response.text), PERSON)
    assert len({r.text for r in responses}) > 10  # sampled, not one forced string


def test_a_hundred_sampled_outputs_all_match_the_regex_and_the_choices(pipe):
    phones = pipe(["Call:"] * 100, temperature=1.0, **constrained(regex=PHONE))
    assert all(re.fullmatch(PHONE, r.text) and r.finish_reason == "stop" for r in phones)
    options = ["yes", "no", 'say "maybe"\n']
    picks = pipe(["Answer:"] * 100, temperature=1.0, **constrained(choice=options))
    assert all(r.text in options and r.finish_reason == "stop" for r in picks)
    assert len({r.text for r in picks}) > 1


def test_json_object_and_ebnf_grammar(pipe):
    objects = pipe(["Data:"] * 4, temperature=1.0, max_new_tokens=40, seed=3, **constrained(json_object=True))
    for response in objects:
        if response.finish_reason == "stop":  # an open-ended object may run out of tokens
            assert isinstance(json.loads(response.text), dict)
        else:
            assert response.text.startswith("{")
    grammar = 'root ::= "(" digit ("+" digit)? ("+" digit)? ")"\ndigit ::= [0-9]'
    for response in pipe(["Sum:"] * 8, temperature=1.0, **constrained(grammar=grammar)):
        assert re.fullmatch(r"\(\d(\+\d){0,2}\)", response.text) and response.finish_reason == "stop"


def test_unconstrained_requests_in_a_mixed_batch_produce_the_tokens_they_produce_alone(pipe):
    prompts = ["Once upon a time", "The cat", "Hello"]
    alone = pipe(prompts, temperature=0, max_new_tokens=12)
    mixed = pipe(prompts + ["A user record:"] * 3, temperature=0, max_new_tokens=12, ignore_eos=False)
    assert [r.token_ids for r in alone] == [r.token_ids for r in mixed[:3]]
    engine = pipe.engine
    ids = [engine.add_request(pipe.encode(p), SamplingParams(temperature=0, max_new_tokens=12)) for p in prompts]
    for index in range(3):
        engine.add_request(pipe.encode("A user record:"), SamplingParams(
            temperature=1.0, seed=index, max_new_tokens=12, **constrained(json=PERSON)))
    tokens = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.get(out.request_id, []).extend(out.new_token_ids)
    assert [tokens[rid] for rid in ids] == [r.token_ids for r in alone]


def test_a_grammar_cut_off_by_max_tokens_ends_with_length_and_the_partial_output(pipe):
    [response] = pipe(["Count:"], temperature=1.0, max_new_tokens=5, **constrained(regex="[0-9]{50}"))
    assert response.finish_reason == "length"
    assert re.fullmatch("[0-9]+", response.text) and len(response.token_ids) == 5


def test_the_grammar_end_stops_the_request_even_with_ignore_eos_and_min_tokens(pipe):
    [ignoring] = pipe(["Answer:"], temperature=1.0, ignore_eos=True, max_new_tokens=20, **constrained(choice=["yes"]))
    assert (ignoring.text, ignoring.finish_reason) == ("yes", "stop")
    [early] = pipe(["Answer:"], temperature=1.0, min_new_tokens=10, max_new_tokens=20, **constrained(choice=["no"]))
    assert (early.text, early.finish_reason) == ("no", "stop")


def test_preempted_constrained_requests_still_validate():
    # 12 blocks of 16 tokens cannot hold 8 growing requests: some are preempted and recomputed
    with splitfuse.pipeline(None, "cpu", dtype="float32", num_kv_blocks=12, kv_block_size=16) as pipe:
        responses = pipe(["A user record:"] * 8, temperature=1.0, max_new_tokens=80, **constrained(json=PERSON))
        assert pipe.engine.stats().preemptions > 0
    for response in responses:
        jsonschema.validate(json.loads(response.text), PERSON)


@pytest.mark.parametrize("spec, problem", [
    ({"json": {"type": "objec"}}, "structured_outputs.json: Unsupported type"),
    ({"json": "{not json"}, "structured_outputs.json: "),
    ({"regex": "a(b"}, "structured_outputs.regex: "),
    ({"grammar": "root ::= missing"}, 'structured_outputs.grammar: .*"missing" is not defined'),
])
def test_an_invalid_constraint_is_refused_at_admission_naming_the_problem(pipe, spec, problem):
    with pytest.raises(AdmissionError, match=problem):
        pipe(["x"], **constrained(**spec))
    assert not pipe.engine.has_unfinished()


def test_structured_outputs_takes_exactly_one_constraint_and_pydantic_models():
    from pydantic import BaseModel, ValidationError

    class Point(BaseModel):
        x: int

    assert StructuredOutputsParams(json=Point).json_schema["properties"] == {"x": {"title": "X", "type": "integer"}}
    with pytest.raises(ValidationError, match="exactly one of json, json_object, regex, choice, grammar; got"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValidationError, match="got none"):
        StructuredOutputsParams()


def test_grammars_are_compiled_once_per_text(pipe):
    constraints: Constraints = pipe.engine.constraints
    spec = StructuredOutputsParams(regex="[ab]{3}")
    assert constraints.compiled(spec) is constraints.compiled(StructuredOutputsParams(regex="[ab]{3}"))


def test_a_matcher_replays_tokens_after_its_sequence_lost_some(pipe):
    # n > 1 forks and recomputes both meet a matcher through the sequence's tokens alone
    from splitfuse.core.constraints import _Matcher

    tokenizer = pipe.tokenizer
    compiled = pipe.engine.constraints.compiled(StructuredOutputsParams(regex="ab+"))
    import xgrammar

    state = _Matcher(xgrammar.GrammarMatcher(compiled))
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    state.sync([a, b, b])
    state.sync([a])  # fewer tokens than accepted: start over and replay
    assert state.num_accepted == 1
    state.sync([a, b])
    assert state.matcher.is_completed()


def bitmask_of(allowed: torch.Tensor) -> torch.Tensor:
    """The int32 bitmask [rows, ceil(V/32)] of a bool [rows, V] tensor of allowed tokens."""
    words = torch.zeros(allowed.shape[0], (allowed.shape[1] + 31) // 32, dtype=torch.int64)
    for row, token in allowed.nonzero().tolist():
        words[row, token // 32] |= 1 << (token % 32)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


@pytest.mark.parametrize("path", ["xgrammar", "torch ops"])  # cpu / every other device
@pytest.mark.parametrize("vocab, padding", [(5, 0), (32, 0), (41, 0), (100, 0), (64, 9)])
def test_apply_token_bitmask_keeps_exactly_the_allowed_tokens(monkeypatch, path, vocab, padding):
    if path == "torch ops":
        monkeypatch.setattr("splitfuse.core.constraints._has_xgrammar", lambda: False)
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab + padding, generator=generator)  # padding: columns no grammar covers
    allowed = torch.rand(2, vocab, generator=generator) < 0.3
    masked = apply_token_bitmask(logits, [0, 2], bitmask_of(allowed))
    assert torch.equal(masked[1], logits[1])
    allowed = torch.nn.functional.pad(allowed, (0, padding), value=False)
    for row, mask_row in ((0, 0), (2, 1)):
        expected = torch.where(allowed[mask_row], logits[row], torch.tensor(float("-inf")))
        assert torch.equal(masked[row], expected)


def test_masks_computed_beside_the_forward_pass_give_the_same_outputs(pipe):
    # device backends fill the masks on a worker thread during the forward pass (overlap)
    kwargs = dict(temperature=1.0, seed=5, max_new_tokens=80, **constrained(json=PERSON))
    inline = pipe(["A user record:"] * 4, **kwargs)
    pipe.engine.constraints.overlap = True
    try:
        overlapped = pipe(["A user record:"] * 4, **kwargs)
    finally:
        pipe.engine.constraints.overlap = False
    assert [r.token_ids for r in overlapped] == [r.token_ids for r in inline]


def test_a_constraint_needs_a_tokenizer_and_xgrammar(monkeypatch):
    from splitfuse.core.constraints import ConstraintError

    params = SamplingParams(**constrained(regex="a"))
    with pytest.raises(ConstraintError, match="needs the model's tokenizer"):
        Constraints(None, 32, [2]).check(params)
    monkeypatch.setitem(__import__("sys").modules, "xgrammar", None)  # as if not installed
    with pytest.raises(ConstraintError, match=r"pip install 'splitfuse\[structured\]'"):
        Constraints(object(), 32, [2]).check(params)


def test_constrained_params_survive_a_process_boundary():
    # replicas receive SamplingParams pickled
    import pickle

    params = SamplingParams(**constrained(json=PERSON))
    assert pickle.loads(pickle.dumps(params)) == params


# the Triton interpreter turns loop bounds into ints through a numpy conversion it deprecates
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_the_cuda_sampler_draws_only_allowed_tokens_from_masked_logits():
    # the Triton sampling kernel (under the interpreter without a GPU) on logits that are mostly -inf
    pytest.importorskip("triton")
    from splitfuse.backends.cuda.backend import CudaBackend
    from splitfuse.core.sampler import SamplingBatch, sample_tokens

    backend, vocab = CudaBackend(), 300
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=generator) * 3
    allowed = torch.zeros(4, vocab, dtype=torch.bool)
    allowed[0, 7] = allowed[1, [3, 150, 299]] = True
    allowed[2:] = torch.rand(2, vocab, generator=generator) < 0.2
    masked = apply_token_bitmask(logits.to(backend.device), [0, 1, 2, 3], bitmask_of(allowed))
    for counter in range(4):
        batch = SamplingBatch(temperatures=[1.0, 0.0, 0.8, 1.3], top_ks=[0, 0, 5, 0], top_ps=[1.0, 1.0, 1.0, 0.9],
                              seeds=[1, None, 3, 4], counters=[counter] * 4, suppressed=[[]] * 4)
        tokens = backend.sample(masked, batch).tolist()
        assert all(allowed[row, token] for row, token in enumerate(tokens))
        assert tokens == sample_tokens(masked.cpu(), batch).tolist()  # the cpu sampler's draws
