"""The command line as a user types it."""

from __future__ import annotations

import subprocess
import sys

from splitfuse.cli import main


def test_generate_with_a_model_directory(tiny_model_dir, capsys):
    code = main(["generate", tiny_model_dir("llama"), "Hello", "--backend", "cpu", "--max-new-tokens", "4",
                 "--temperature", "0", "--ignore-eos", "--token-budget", "8"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.startswith("Hello")
    assert "4 tokens, finish_reason=length" in captured.err


def test_generate_on_the_embedded_default_model(capsys):
    # No model argument: the embedded tiny model is built once into the cache and used.
    assert main(["generate", "def fibonacci(n):", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def fibonacci(n):")


def test_generate_streams(tiny_model_dir, capsys):
    assert main(["generate", "--model", tiny_model_dir("llama"), "Hi", "--stream", "--max-new-tokens", "5",
                 "--temperature", "0", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_generate_bad_value_is_a_clear_error(tiny_model_dir, capsys):
    assert main(["generate", tiny_model_dir("llama"), "Hi", "--top-p", "2"]) == 1
    assert "--top-p must be <= 1" in capsys.readouterr().err


def test_generate_missing_model_dir(capsys):
    assert main(["generate", "/no/such/model", "Hi"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_make_tiny_model_then_generate(tmp_path, capsys):
    target = tmp_path / "tiny-qwen2"
    assert main(["make-tiny-model", str(target), "--arch", "qwen2"]) == 0
    assert (target / "config.json").is_file() and list(target.glob("*.safetensors"))
    assert main(["generate", str(target), "x = ", "--max-new-tokens", "2", "--backend", "cpu"]) == 0


def test_python_dash_m_lists_backends_and_models():
    backends = subprocess.run([sys.executable, "-m", "splitfuse", "backends"], capture_output=True, text=True)
    assert backends.returncode == 0
    assert "cpu" in backends.stdout and "available" in backends.stdout
    models = subprocess.run([sys.executable, "-m", "splitfuse", "models"], capture_output=True, text=True)
    assert "LlamaForCausalLM" in models.stdout.split()


def test_prefix_caching_is_on_unless_no_prefix_caching_is_given():
    from splitfuse.cli import _picked, build_parser, engine_flags
    from splitfuse.config import EngineConfig

    parser = build_parser()
    assert _picked(parser.parse_args(["serve"]), EngineConfig) == {}
    off = _picked(parser.parse_args(["serve", "--no-prefix-caching"]), EngineConfig)
    assert off == {"enable_prefix_caching": False}
    assert EngineConfig(**off).enable_prefix_caching is False and EngineConfig().enable_prefix_caching is True
    # a child server (the benchmark's) gets the same setting back as flags
    assert engine_flags({"enable_prefix_caching": False, "token_budget": 64}) == [
        "--no-prefix-caching", "--token-budget", "64"]
    assert engine_flags({"enable_prefix_caching": True, "enforce_eager": True}) == ["--enforce-eager"]


def test_generate_runs_with_prefix_caching_off(tiny_model_dir, capsys):
    assert main(["generate", tiny_model_dir("llama"), "Hello", "--no-prefix-caching", "--max-new-tokens", "3",
                 "--backend", "cpu", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello") and "3 tokens, finish_reason=length" in captured.err
