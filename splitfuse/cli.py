"""Command line: `splitfuse generate | serve | bench | backends | models | make-tiny-model` (also `python -m splitfuse`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import typing

from pydantic import BaseModel, ValidationError

from splitfuse.cli_format import describe_validation_error, format_logprobs, response_json
from splitfuse.config import EngineConfig, SamplingParams


def field_flag(name: str, info) -> str:
    """The CLI flag of a pydantic field: --token-budget; a switch that is on by default is turned
    off with --no-...: enable_prefix_caching -> --no-prefix-caching."""
    if info.annotation is bool and info.default is True:
        return "--no-" + name.removeprefix("enable_").replace("_", "-")
    return "--" + name.replace("_", "-")


def engine_flags(engine: dict) -> list[str]:
    """Command-line flags that give a child `splitfuse serve` these EngineConfig values."""
    flags: list[str] = []
    for name, value in engine.items():
        info = EngineConfig.model_fields[name]
        flag = field_flag(name, info)
        if info.annotation is bool:
            if value is not None and value != info.default:
                flags.append(flag)
        elif isinstance(value, list):
            for item in value:
                flags += [flag, str(item)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default where it has a real one (not None or an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.default in (None, False, True, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


class _SubcommandParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("splitfuse")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from splitfuse import __version__

        return __version__


def self_command() -> list[str]:
    """argv that runs this command line in a child process whatever the current directory holds:
    `python -m splitfuse` would put the current directory first on sys.path, so a folder named
    splitfuse there (a clone, say) would shadow an editable install as an empty namespace package."""
    bootstrap = "import sys; del sys.path[0]; from splitfuse.cli import main; sys.exit(main())"
    return [sys.executable, "-c", bootstrap]


# Short spellings users know from vLLM.
_ALIASES = {"tensor_parallel_size": ("-tp",)}


def _add_model_fields(parser: argparse.ArgumentParser, model: type[BaseModel], title: str) -> None:
    """One --flag per pydantic field, so the CLI and the Python API share names and validation."""
    group = parser.add_argument_group(title)
    for name, info in model.model_fields.items():
        flags = (field_flag(name, info), *_ALIASES.get(name, ()))
        annotation = info.annotation
        args = typing.get_args(annotation)
        help_text = info.description or ""
        if info.default is not None and not info.is_required():
            help_text = f"{help_text} (default: {info.default})".strip()
        if annotation is bool:
            action = "store_false" if info.default is True else "store_true"
            group.add_argument(*flags, dest=name, action=action, default=None, help=help_text)
        elif typing.get_origin(annotation) is list:
            item = args[0] if args else str
            group.add_argument(*flags, dest=name, action="append", type=item, default=None,
                               help=(help_text + " (repeat for several)").strip())
        else:
            kinds = [a for a in args if a is not type(None)] or [annotation]
            kind = kinds[0] if kinds[0] in (int, float) else str
            group.add_argument(*flags, dest=name, type=kind, default=None, help=help_text)


def _picked(args: argparse.Namespace, model: type[BaseModel]) -> dict:
    return {n: getattr(args, n) for n in model.model_fields if getattr(args, n, None) is not None}


def _looks_like_a_path(word: str) -> bool:
    """A word a user means as a directory: it starts like a path and has no spaces (prompts do)."""
    return word.startswith(("/", "./", "../", "~")) and not any(c.isspace() for c in word)


def _split_model_and_prompts(positional: list[str], model_flag: str | None) -> tuple[str | None, list[str]]:
    """`generate [MODEL] PROMPT...`: the first word is the model only when it is an existing
    directory or unmistakably a path; anything else is a prompt for the embedded demo model."""
    if model_flag is not None:
        return model_flag, positional
    first = positional[0] if positional else ""
    if os.path.isdir(first):
        if len(positional) == 1:
            raise ValueError(f"{first!r} is a model directory but no prompt follows it: "
                             f"`splitfuse generate --model {first} PROMPT`")
        return first, positional[1:]
    if _looks_like_a_path(first) and len(positional) >= 2:
        raise ValueError(f"model directory {first!r} does not exist (the first word was taken as a model "
                         "because it looks like a path; to send it as a prompt, name the model with --model)")
    return None, positional


def _print_details(response, tokenizer) -> None:
    """After a response's text: its log-probabilities (when asked for) and the length line."""
    if response.logprobs is not None:
        print(format_logprobs(tokenizer, response.logprobs))
    print(f"[{response.generated_length} tokens, finish_reason={response.finish_reason}]", file=sys.stderr)


@contextlib.contextmanager
def _load_log(verbose: bool):
    """With --verbose, the load log (weight bytes and quantization, KV blocks) goes to stderr."""
    if not verbose:
        yield
        return
    logger, handler = logging.getLogger("splitfuse"), logging.StreamHandler(sys.stderr)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def cmd_generate(args: argparse.Namespace) -> int:
    from splitfuse.pipeline import pipeline

    model, prompts = _split_model_and_prompts(args.words, args.model)
    if not prompts:
        print("error: give at least one prompt", file=sys.stderr)
        return 2
    if args.stream and args.json:
        print("error: --stream and --json cannot be combined: JSON is written once a response is complete",
              file=sys.stderr)
        return 2
    with _load_log(args.verbose):
        pipe = pipeline(model, backend=args.backend, **_picked(args, EngineConfig))
    sampling = _picked(args, SamplingParams)
    if args.stream:
        # one prompt after another, each streamed as it is generated
        for prompt in prompts:
            print(prompt, end="", flush=True)
            stream = pipe.stream(prompt, **sampling)
            while True:
                try:
                    print(next(stream), end="", flush=True)
                except StopIteration as done:
                    response = done.value
                    break
            print()
            _print_details(response, pipe.tokenizer)
        return 0
    for prompt, response in zip(prompts, pipe(prompts, **sampling)):
        if args.json:
            print(response_json(prompt, response, pipe.tokenizer))
        else:
            print(f"{prompt}{response.text}")
            _print_details(response, pipe.tokenizer)
    return 0


def _host_list(value: str) -> frozenset[str] | None:
    """--allowed-hosts: a comma list of names; "*" allows any Host."""
    names = frozenset(name.strip().lower() for name in value.split(",") if name.strip())
    return None if "*" in names else names


def cmd_serve(args: argparse.Namespace) -> int:
    from splitfuse.serving.server import run

    if args.model is not None and args.model_positional is not None and args.model != args.model_positional:
        print(f"error: two models given: {args.model_positional!r} and --model {args.model!r}", file=sys.stderr)
        return 2
    args.model = args.model or args.model_positional

    template = None
    if args.chat_template is not None:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    if args.ray is not None:
        from splitfuse.serving.ray_replicas import import_ray

        try:
            import_ray()
        except ImportError as exc:
            print(f"error: --ray: {exc}", file=sys.stderr)
            return 2
    run(args.model, host=args.host, port=args.port, backend=args.backend, api_key=args.api_key,
        chat_template=template, max_waiting=args.max_waiting, served_model_name=args.served_model_name,
        replicas=args.replicas, ray_address=args.ray, drain_timeout=args.drain_timeout,
        client_timeout_s=args.client_timeout,
        **({} if args.allowed_hosts is None else {"allowed_hosts": _host_list(args.allowed_hosts)}),
        **_picked(args, EngineConfig))
    return 0


def _print_plugin_failures(manager) -> None:
    """Plugins that did not load or had a registration refused, with where they came from and why."""
    if manager.failures:
        print("\nplugins with problems (everything else works without them):")
        for failure in manager.failures:
            print(f"  {failure.name} ({failure.source or 'unknown source'}): {failure.error}")


def cmd_backends(args: argparse.Namespace) -> int:
    from splitfuse.backends import list_backends
    from splitfuse.plugins import get_plugin_manager

    manager = get_plugin_manager()
    registry = manager.backends()
    manager.models()  # so that failures of model plugins are listed as well
    failed = {(f.name, f"plugin failed to load: {f.error}") for f in manager.failures}
    # failed plugins are listed with the other plugin problems below
    infos = [i for i in list_backends() if (i.name, i.reason) not in failed]
    width = max((len(registry.source(i.name)) for i in infos), default=0)
    for info in infos:
        state = "available" if info.available else f"unavailable: {info.reason}"
        if info.available and not info.auto_selectable:
            state += " (only when named: `auto` does not pick it)"
        # which ops the cpu backend runs (not said of subclasses: a plugin built on it runs its own)
        cls = registry.get(info.name)
        if info.available and "kernels" in vars(cls):
            state += f" ({cls.kernels()})"
        print(f"{info.name:<12} priority {info.priority:>4}  {registry.source(info.name):<{width}}  {state}")
        if info.available and "linear_paths" in vars(cls):  # the cpu backend's dense bf16 linear
            print(f"{'':<12} {cls.linear_paths()}")
    _print_plugin_failures(manager)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from splitfuse.plugins import get_plugin_manager

    manager = get_plugin_manager()
    registry = manager.models()
    manager.backends()  # so that failures of backend plugins are listed as well
    width = max((len(arch) for arch in registry.names()), default=0)
    for arch in registry.names():
        print(f"{arch:<{width}}  {registry.source(arch)}")
    _print_plugin_failures(manager)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from splitfuse.bench.cli_args import run_from_args

    return run_from_args(args, _picked(args, EngineConfig))


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from splitfuse.testing.tiny_model import make_tiny_model

    path = make_tiny_model(
        args.dir, args.arch, num_layers=args.layers, hidden_size=args.hidden_size, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size, seed=args.seed,
    )
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitfuse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"splitfuse {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)

    gen = sub.add_parser("generate", help="generate text for prompts (MODEL omitted: the embedded default)")
    gen.add_argument("words", nargs="+", metavar="PROMPT",
                     help="prompts; the first word is taken as a model (MODEL PROMPT...) when it is an "
                          "existing directory")
    gen.add_argument("-m", "--model", default=None,
                     help="model directory (default: the embedded demo model); every positional word is then a prompt")
    gen.add_argument("--json", action="store_true",
                     help="one JSON object per prompt: text, token ids, finish reason, log-probabilities")
    gen.add_argument("--backend", default=None, help="auto, cpu, cuda, xpu or a plugin's name (env SPLITFUSE_BACKEND)")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated (prompts one after another)")
    gen.add_argument("--verbose", action="store_true", help="print the load log: weight bytes, quantization, KV blocks")
    _add_model_fields(gen, EngineConfig, "engine")
    _add_model_fields(gen, SamplingParams, "sampling (unset: the model's generation_config.json, else the default)")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (MODEL omitted: the embedded default)")
    srv.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                     help="model directory (default: the embedded demo model)")
    srv.add_argument("-m", "--model", default=None, help="model directory (the same as MODEL)")
    srv.add_argument("--backend", default=None, help="auto, cpu, cuda, xpu or a plugin's name (env SPLITFUSE_BACKEND)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    srv.add_argument("--api-key", default=os.environ.get("SPLITFUSE_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1/* (env SPLITFUSE_API_KEY)")
    srv.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template file")
    srv.add_argument("--max-waiting", type=int, default=1024,
                     help="requests not yet started (over all replicas together) before answering 429")
    srv.add_argument("--replicas", type=int, default=1,
                     help="engine processes; each request goes to the one with the fewest outstanding tokens")
    srv.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the replicas as Ray actors: ADDRESS omitted starts Ray here, 'auto' joins the "
                          "cluster this machine is in (`ray start`), or a Ray address (needs splitfuse[ray])")
    srv.add_argument("--served-model-name", default=None, help="model name in the API (default: directory name)")
    srv.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                     help="Host header names to answer, comma-separated, '*' for any (default: the loopback "
                          "names when bound to loopback, else any); guards against DNS rebinding")
    srv.add_argument("--client-timeout", type=float, default=30.0, metavar="S",
                     help="seconds a client may pause sending its body or reading its reply")
    srv.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                     help="on SIGTERM/SIGINT, seconds running requests have to finish before they get 503")
    _add_model_fields(srv, EngineConfig, "engine")
    srv.set_defaults(func=cmd_serve)

    sub.add_parser("backends", help="list registered backends and whether each can run here").set_defaults(
        func=cmd_backends)
    sub.add_parser("models", help="list supported model architectures").set_defaults(func=cmd_models)

    tiny = sub.add_parser("make-tiny-model", help="write a random-weight HF model with a tokenizer (tests, demos)")
    tiny.add_argument("dir")
    from splitfuse.testing.tiny_model import ARCHITECTURES

    tiny.add_argument("--arch", default="llama", choices=sorted(ARCHITECTURES))
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--kv-heads", type=int, default=2)
    tiny.add_argument("--intermediate-size", type=int, default=128)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny_model)

    from splitfuse.bench.cli_args import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="latency-throughput curves and effective throughput: splitfuse, "
                                         "HF transformers, any OpenAI-compatible server")
    add_bench_arguments(bench)
    _add_model_fields(bench, EngineConfig, "engine (splitfuse's own server)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:
        print(f"error: {describe_validation_error(exc, (EngineConfig, SamplingParams))}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
