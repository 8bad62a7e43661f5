"""The command line as a new user meets it: which word is the model, readable errors and output."""

from __future__ import annotations

import json
import subprocess

import pytest

from splitfuse.cli import _split_model_and_prompts, build_parser, main, self_command

GREEDY = ["--temperature", "0", "--ignore-eos", "--backend", "cpu"]


def test_prompts_with_slashes_are_prompts_not_models():
    assert _split_model_and_prompts(["x = 1/2", "y = 3"], None) == (None, ["x = 1/2", "y = 3"])
    assert _split_model_and_prompts(["a/b"], None) == (None, ["a/b"])


def test_an_existing_directory_first_is_the_model(tmp_path, monkeypatch):
    (tmp_path / "tiny-llama").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _split_model_and_prompts(["tiny-llama", "x = "], None) == ("tiny-llama", ["x = "])
    with pytest.raises(ValueError, match="'tiny-llama' is a model directory but no prompt follows"):
        _split_model_and_prompts(["tiny-llama"], None)
    # with --model every word is a prompt, even one that names a directory
    assert _split_model_and_prompts(["tiny-llama"], "other") == ("other", ["tiny-llama"])


def test_a_missing_path_says_it_was_taken_as_a_model(capsys):
    assert main(["generate", "./no/such/model", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "'./no/such/model' does not exist" in err and "taken as a model" in err and "--model" in err


@pytest.mark.parametrize("argv, expected", [
    (["--temperature", "-1"], "error: --temperature must be >= 0 (got -1)"),
    (["--top-p", "2"], "error: --top-p must be <= 1 (got 2)"),
    (["--token-budget", "0"], "error: --token-budget must be >= 1 (got 0)"),
    (["--dtype", "float8"], "error: --dtype must be one of 'auto', 'float32', 'bfloat16' or 'float16' (got 'float8')"),
])
def test_bad_values_name_the_flag_without_pydantic_noise(argv, expected, tiny_model_dir, capsys):
    assert main(["generate", "-m", tiny_model_dir("llama"), "Hi", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the fixture's first-use progress bar
    assert err == expected
    assert "pydantic" not in err and "validation error" not in err


def test_logprobs_are_printed_as_a_table(tiny_model_dir, capsys):
    assert main(["generate", "-m", tiny_model_dir("llama"), "Hello", "--logprobs", "2", "--max-new-tokens", "3",
                 *GREEDY]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out.index("token logprobs (token, logprob, top alternatives):")
    rows = out[header + 1:]
    assert len(rows) == 3
    for row in rows:
        # the token, its log-probability, then two alternatives with theirs
        assert float(row.split()[1]) <= 0 and row.count("'") >= 6


def test_json_output_has_text_tokens_and_logprobs(tiny_model_dir, capsys):
    assert main(["generate", "-m", tiny_model_dir("llama"), "Hello", "Bye", "--json", "--logprobs", "1",
                 "--max-new-tokens", "2", *GREEDY]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "Bye"]
    for record in records:
        assert len(record["token_ids"]) == 2 and record["finish_reason"] == "length"
        assert [e["token_id"] for e in record["logprobs"]] == record["token_ids"]
        assert all(len(e["top"]) == 1 and e["logprob"] <= 0 for e in record["logprobs"])


def test_stream_with_several_prompts_streams_each_with_its_echo_and_length(tiny_model_dir, capsys):
    plain = main(["generate", "-m", tiny_model_dir("llama"), "Hello", "Bye", "--max-new-tokens", "3", *GREEDY])
    expected = capsys.readouterr()
    assert plain == 0
    assert main(["generate", "-m", tiny_model_dir("llama"), "Hello", "Bye", "--stream", "--max-new-tokens", "3",
                 *GREEDY]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == expected.out
    assert streamed.err.count("[3 tokens, finish_reason=length]") == 2


def test_stream_and_json_together_are_refused(capsys):
    assert main(["generate", "Hi", "--stream", "--json"]) == 2
    assert "--stream and --json cannot be combined" in capsys.readouterr().err


def test_version_and_help_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("splitfuse 0.")
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert "(default: 768)" in text  # --token-budget
    assert "(default: 8000)" in text  # --port
    assert "(default: None)" not in text


def test_serve_takes_the_model_as_an_option_too():
    args = build_parser().parse_args(["serve", "-m", "some/dir", "--port", "0"])
    assert args.model == "some/dir" and args.model_positional is None


def test_a_too_long_prompt_says_what_can_be_done(tiny_model_dir, capfd):
    prompt = "word " * 400
    assert main(["generate", "-m", tiny_model_dir("llama"), prompt, "--max-model-len", "64", *GREEDY]) == 1
    err = capfd.readouterr().err
    assert "raise max_model_len (up to the model's limit of" in err
    # transformers' own length warning does not precede our message
    assert "Token indices sequence length" not in err


def test_child_processes_ignore_a_splitfuse_folder_in_the_current_directory(tmp_path):
    (tmp_path / "splitfuse").mkdir()  # what a clone named splitfuse looks like from its parent folder
    listed = subprocess.run([*self_command(), "models"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "LlamaForCausalLM" in listed.stdout.split()
