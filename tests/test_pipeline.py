"""The Python API as a user sees it: responses, streaming, stop handling, logprobs, bad input."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import splitfuse
from splitfuse.backends import BackendError
from splitfuse.models import ModelLoadError


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", token_budget=16, kv_block_size=4,
                              num_kv_blocks=256)


def all_blocks_free(pipe) -> bool:
    return pipe.engine.blocks.num_free == pipe.engine.blocks.num_blocks and not pipe.engine.has_unfinished()


def test_responses_in_prompt_order_with_their_fields(pipe):
    prompts = ["Hello world", [1, 200, 77], "def f(x):"]
    out = pipe(prompts, max_new_tokens=5, temperature=0.0, ignore_eos=True)
    assert len(out) == 3
    assert out[1].prompt_length == 3  # token-id prompts are used as given: no BOS added
    assert out[0].prompt_length == len(pipe.tokenizer("Hello world")["input_ids"])
    for response in out:
        assert len(response.token_ids) == 5 == response.generated_length
        assert response.finish_reason == "length"
        assert response.text == pipe.tokenizer.decode(response.token_ids, skip_special_tokens=True)
    # Each prompt alone gives what it gave in the batch.
    assert pipe(prompts[1], max_new_tokens=5, temperature=0.0, ignore_eos=True)[0].token_ids == out[1].token_ids
    assert all_blocks_free(pipe)


def test_string_prompt_gets_the_tokenizers_bos(pipe):
    ids = pipe.encode("Hello")
    assert ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.encode([5, 6]) == [5, 6]


def test_stream_yields_the_same_text_as_a_call(pipe):
    full = pipe("The quick brown fox", max_new_tokens=12, temperature=0.0, ignore_eos=True)[0]
    pieces = list(pipe.stream("The quick brown fox", max_new_tokens=12, temperature=0.0, ignore_eos=True))
    assert "".join(pieces) == full.text
    assert all(all_blocks_free(pipe) for _ in [0])


def test_leaving_a_stream_early_frees_its_blocks(pipe):
    stream = pipe.stream("Once upon a time", max_new_tokens=200, temperature=0.0, ignore_eos=True)
    next(stream)
    assert pipe.engine.blocks.num_used > 0
    stream.close()
    assert all_blocks_free(pipe)


def test_stop_string_ends_generation_and_is_cut(pipe):
    base = pipe([[1, 300, 301]], max_new_tokens=12, temperature=0.0, ignore_eos=True)[0]
    assert len(base.text) > 4
    stop = base.text[2:4]  # a string that appears in the output
    cut = pipe([[1, 300, 301]], max_new_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base.text[: base.text.index(stop)]
    assert all_blocks_free(pipe)


def test_stop_token_ids_and_eos(pipe):
    base = pipe([[1, 42]], max_new_tokens=8, temperature=0.0, ignore_eos=True)[0].token_ids
    stopped = pipe([[1, 42]], max_new_tokens=8, temperature=0.0, stop_token_ids=[base[3]], ignore_eos=True)[0]
    assert stopped.token_ids == base[: base.index(base[3]) + 1]
    assert stopped.finish_reason == "stop"


def test_min_new_tokens_holds_back_stop_tokens(pipe):
    base = pipe([[1, 42]], max_new_tokens=8, temperature=0.0, ignore_eos=True)[0].token_ids
    first = base[0]
    out = pipe([[1, 42]], max_new_tokens=8, min_new_tokens=4, temperature=0.0, stop_token_ids=[first],
               ignore_eos=True)[0]
    assert first not in out.token_ids[:4]
    assert len(out.token_ids) >= 4


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed(pipe):
    kwargs = dict(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    a = pipe([[1, 9, 10]], seed=7, **kwargs)[0].token_ids
    b = pipe([[1, 9, 10]], seed=7, **kwargs)[0].token_ids
    c = pipe([[1, 9, 10]], seed=8, **kwargs)[0].token_ids
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(pipe):
    greedy = pipe([[1, 9, 10]], max_new_tokens=8, temperature=0.0, ignore_eos=True)[0].token_ids
    top1 = pipe([[1, 9, 10]], max_new_tokens=8, temperature=1.5, top_k=1, seed=3, ignore_eos=True)[0].token_ids
    assert top1 == greedy


def test_logprobs_match_hf(pipe, hf_model, tiny_model_dir):
    prompt = [1, 17, 99, 250]
    out = pipe([prompt], max_new_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3)[0]
    assert len(out.logprobs) == 4
    model = hf_model(tiny_model_dir("llama"))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(out.logprobs):
        row = reference[len(prompt) - 1 + i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        top_ids = torch.topk(row, 3).indices.tolist()
        assert list(lp.top) == top_ids
        assert lp.top[top_ids[0]] == pytest.approx(row[top_ids[0]].item(), abs=1e-4)


def test_no_logprobs_unless_asked(pipe):
    assert pipe([[1, 5]], max_new_tokens=2, temperature=0.0)[0].logprobs is None


# ---- bad input: a clear error that names what to fix, and the engine keeps working ------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(min_new_tokens=9, max_new_tokens=3), "min_new_tokens"),
])
def test_bad_sampling_values_name_the_field(pipe, kwargs, field):
    with pytest.raises(ValidationError, match=field):
        pipe(["hi"], **kwargs)
    assert all_blocks_free(pipe)


def test_unknown_argument_is_named(pipe):
    with pytest.raises(ValidationError, match="max_tokens[\\s\\S]*Extra inputs are not permitted"):
        pipe(["hi"], max_tokens=3)


def test_empty_prompt_list(pipe):
    with pytest.raises(ValueError, match="prompts is empty"):
        pipe([])


def test_empty_prompt(pipe):
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        pipe([[5, 6], []])
    assert all_blocks_free(pipe)


def test_prompt_longer_than_max_model_len(tiny_model_dir):
    small = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len is 32"):
        small([[5] * 10, [5] * 40], max_new_tokens=4)
    assert all_blocks_free(small)
    # A request that reaches max_model_len stops there with finish_reason "length".
    out = small([[5] * 30], max_new_tokens=10, temperature=0.0, ignore_eos=True)[0]
    assert (len(out.token_ids), out.finish_reason) == (2, "length")


def test_request_larger_than_the_kv_cache(tiny_model_dir):
    small = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", kv_block_size=4, num_kv_blocks=4)
    with pytest.raises(ValueError, match="KV cache"):
        small([[5] * 10], max_new_tokens=10)
    assert small([[5] * 4], max_new_tokens=4, temperature=0)[0].generated_length >= 1


def test_out_of_vocabulary_token(pipe):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pipe([[1, 10_000]])


def test_unknown_backend_lists_the_registered_ones(tiny_model_dir):
    with pytest.raises(BackendError, match=r"unknown backend 'tpu9'[\s\S]*cpu: available"):
        splitfuse.pipeline(tiny_model_dir("llama"), backend="tpu9")


def test_bad_engine_value_names_the_field(tiny_model_dir):
    with pytest.raises(ValidationError, match="token_budget"):
        splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", token_budget=0)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        splitfuse.pipeline(tmp_path / "nope", backend="cpu")


def test_bin_only_model_is_refused(tmp_path, tiny_model_dir):
    import shutil

    target = tmp_path / "bin-only"
    shutil.copytree(tiny_model_dir("llama"), target)
    for f in target.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="safetensors only"):
        splitfuse.pipeline(target, backend="cpu")


def test_unsupported_architecture_lists_supported(tmp_path, tiny_model_dir):
    import json
    import shutil

    target = tmp_path / "other-arch"
    shutil.copytree(tiny_model_dir("llama"), target)
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'FancyNewForCausalLM'.*not supported; supported: ") as info:
        splitfuse.pipeline(target, backend="cpu")
    from splitfuse.models import supported_architectures

    listed = str(info.value).split("supported: ", 1)[1]
    assert listed.split(", ") == supported_architectures()


def test_closed_pipeline_refuses_work(tiny_model_dir):
    p = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", num_kv_blocks=16)
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p(["hi"])


def test_bfloat16_runs(tiny_model_dir):
    p = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", dtype="bfloat16", num_kv_blocks=64)
    assert p.engine.model.dtype == torch.bfloat16
    out = p([[1, 5, 6, 7]], max_new_tokens=4, temperature=0.0, ignore_eos=True)[0]
    assert len(out.token_ids) == 4


def test_close_and_garbage_collection_free_the_kv_cache(tiny_model_dir):
    import gc
    import weakref

    p = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", num_kv_blocks=16)
    cache = weakref.ref(p.engine.kv_cache[0])
    p.close()
    gc.collect()
    assert cache() is None
    q = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", num_kv_blocks=16)
    cache = weakref.ref(q.engine.kv_cache[0])
    del q
    gc.collect()
    assert cache() is None


def test_max_model_len_beyond_the_model_is_refused(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="max_position_embeddings"):
        splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", max_model_len=100_000)


def test_generation_config_supplies_eos_ids_and_sampling_defaults(tmp_path, tiny_model_dir, pipe):
    """Llama 3 lists several EOS ids and sampling defaults in generation_config.json."""
    import json
    import shutil

    base = pipe([[1, 42]], max_new_tokens=8, temperature=0.0, ignore_eos=True)[0].token_ids
    extra_eos = base[2]
    target = tmp_path / "llama3-style"
    shutil.copytree(tiny_model_dir("llama"), target)
    (target / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, extra_eos], "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 5}))
    p = splitfuse.pipeline(target, backend="cpu", num_kv_blocks=64)
    assert p.engine.eos_token_ids == {2, extra_eos}
    params = p.sampling_params()
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 5)
    assert p.sampling_params(temperature=0.0).temperature == 0.0  # a call's value wins
    out = p([[1, 42]], max_new_tokens=8, temperature=0.0)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base[: base.index(extra_eos) + 1]  # the second EOS id ends generation


def test_greedy_model_default_when_generation_config_does_not_sample(tiny_model_dir):
    p = splitfuse.pipeline(tiny_model_dir("llama"), backend="cpu", num_kv_blocks=16)
    assert p.sampling_params().temperature == 0.0  # do_sample false in the tiny model's config


def test_remote_code_runs_only_when_trusted(tmp_path, tiny_model_dir):
    """A config that points at Python code in the model directory is refused unless trusted."""
    import json
    import shutil

    target = tmp_path / "custom-code"
    shutil.copytree(tiny_model_dir("llama"), target)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "custom_llama"  # unknown to transformers: only the shipped code defines it
    config["auto_map"] = {"AutoConfig": "custom_config.CustomConfig"}
    (target / "config.json").write_text(json.dumps(config))
    (target / "custom_config.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
    )
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        splitfuse.pipeline(target, backend="cpu", num_kv_blocks=16)
    trusted = splitfuse.pipeline(target, backend="cpu", num_kv_blocks=16, trust_remote_code=True)
    assert type(trusted.engine.model.config).__name__ == "CustomConfig"


def test_sampling_layers_model_then_front_end_then_request():
    from splitfuse.config import resolve_sampling

    model = {"temperature": 0.6, "top_p": 0.9, "top_k": 5}
    front = {"top_k": 40, "max_new_tokens": 20}
    params = resolve_sampling(model, front, {"temperature": 0.2, "top_p": None, "seed": 7})
    # temperature from the request, top_k from the front end, top_p from the model (the request's
    # None means "not given"), the rest SamplingParams' own defaults.
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens, params.seed) == (
        0.2, 0.9, 40, 20, 7)
    assert resolve_sampling() == splitfuse.SamplingParams()
    with pytest.raises(ValidationError, match="top_p"):
        resolve_sampling({"top_p": 0.9}, None, {"top_p": 2.0})


def test_pipeline_defaults_sit_between_the_models_and_the_calls(tmp_path, tiny_model_dir):
    import json
    import shutil

    target = tmp_path / "sampling-model"
    shutil.copytree(tiny_model_dir("llama"), target)
    (target / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 5}))
    p = splitfuse.pipeline(target, backend="cpu", num_kv_blocks=16, top_k=9)
    assert (p.sampling_params().temperature, p.sampling_params().top_k) == (0.6, 9)
    assert p.sampling_params(top_k=3, temperature=None).top_k == 3
    assert p.sampling_params(temperature=None).temperature == 0.6  # None: not given
