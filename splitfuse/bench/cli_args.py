"""Flags of `splitfuse bench` and their translation to BenchOptions (argparse only: cheap to import)."""

from __future__ import annotations

import argparse
import json
import sys


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"top_k\": 5}}', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench subcommand's own flags (engine flags are added by the CLI from EngineConfig)."""
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="model directory (omitted: the embedded default); with --endpoint, used for the "
                             "tokenizer and the HF baseline only")
    parser.add_argument("--out", default="bench-results", metavar="DIR",
                        help="where results.json and the plots go (bench-results/ is git-ignored)")
    parser.add_argument("--backend", default=None, help="backend of splitfuse's engine (auto, cpu, cuda, ...)")
    parser.add_argument("--endpoint", action="append", default=[], metavar="URL",
                        help="benchmark an OpenAI-compatible server (http://host:port/v1) instead of starting "
                             "splitfuse's own; repeat for several")
    parser.add_argument("--served-model", "--model", dest="served_model", default=None, metavar="NAME",
                        help="model name to send to --endpoint (default: the first it lists)")
    parser.add_argument("--api-key", default=None, help="bearer token for --endpoint")
    parser.add_argument("--baseline", default="", metavar="LIST",
                        help="comma-separated: hf (static generate batches and transformers' continuous batching), "
                             "hf-static, hf-cb, no-prefix-cache (splitfuse's own server with prefix caching off)")
    load = parser.add_argument_group("load")
    load.add_argument("--clients", type=_int_list, default=None,
                      help="closed loop: concurrent clients to sweep (default 1,2,4,8,16,32 unless --rate is given)")
    load.add_argument("--rate", type=_float_list, default=[],
                      help="open loop: Poisson request rates per second to sweep, e.g. 1,2,4")
    load.add_argument("--requests", type=int, default=64, help="requests per load point (default 64)")
    load.add_argument("--warmup", type=int, default=2, help="untimed requests before each system's sweep")
    work = parser.add_argument_group("workload")
    work.add_argument("--prompt-len", type=int, default=2600, help="mean prompt tokens (FastGen: 2600 or 1200)")
    work.add_argument("--gen-len", type=int, default=60, help="mean generated tokens (FastGen: 60 or 128)")
    work.add_argument("--variance", type=float, default=0.3,
                      help="std / mean of both lengths (FastGen's 30%%); 0 gives fixed lengths")
    work.add_argument("--shared-prefix-len", type=int, default=0, metavar="N",
                      help="every prompt starts with the same N random tokens (a system prompt), then its own "
                           "--prompt-len suffix")
    work.add_argument("--prompts-file", default=None, metavar="FILE",
                      help="JSONL ({\"prompt\": text or ids, \"max_tokens\": n}) or one prompt per line")
    work.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer for text prompts (default: MODEL's)")
    work.add_argument("--max-len", type=int, default=None, help="longest prompt + generation (default: the model's)")
    ids = work.add_mutually_exclusive_group()
    ids.add_argument("--send-ids", dest="send_ids", action="store_true", default=None,
                     help="send prompts as token ids (default for splitfuse's own server)")
    ids.add_argument("--send-text", dest="send_ids", action="store_false",
                     help="send prompts as text decoded from the ids (default for --endpoint)")
    work.add_argument("--seed", type=int, default=0, help="seed of lengths, prompt ids and arrivals")
    sent = parser.add_argument_group(
        "requests", "what each request asks besides its prompt and max_tokens; none given: nothing else is sent to "
        "--endpoint servers (their defaults apply), splitfuse's own server decodes greedily to fixed lengths")
    sent.add_argument("--temperature", type=float, default=None, help="temperature to send")
    sent.add_argument("--top-p", type=float, default=None, help="top_p to send")
    sent.add_argument("--ignore-eos", action="store_true", default=None,
                      help="send ignore_eos (vLLM's and splitfuse's extension): every request generates max_tokens")
    sent.add_argument("--min-tokens", action="store_true", default=None,
                      help="send min_tokens = max_tokens (vLLM's and splitfuse's extension)")
    sent.add_argument("--extra-body", type=_json_object, default=None, metavar="JSON",
                      help="more fields to send, as a JSON object, e.g. '{\"top_k\": 5}'")
    sla = parser.add_argument_group("metrics")
    sla.add_argument("--sla-rates", type=_float_list, default=[2.0, 4.0, 6.0],
                     help="tokens/s of FastGen's SLA for effective throughput (default 2,4,6)")
    sla.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                     help="vLLM goodput limits in ms, e.g. ttft:500 tpot:50 (also e2e)")
    hf = parser.add_argument_group("HF baseline")
    hf.add_argument("--hf-device", default="auto",
                    help="device of the HF baseline (default: the device type splitfuse's backend runs on)")
    hf.add_argument("--hf-dtype", default="auto", help="dtype of the HF baseline (default: the engine's)")
    hf.add_argument("--hf-batch-size", type=int, default=32, help="largest static batch (open loop)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="write results.json only")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_from_args(args: argparse.Namespace, engine: dict) -> int:
    """Run `splitfuse bench` with parsed flags; engine holds the EngineConfig fields given."""
    from splitfuse.bench import metrics
    from splitfuse.bench.runner import BenchOptions, run

    clients = args.clients if args.clients is not None else ([] if args.rate else [1, 2, 4, 8, 16, 32])
    baselines = [b.strip() for b in args.baseline.split(",") if b.strip()]
    unknown = sorted(set(baselines) - {"hf", "hf-static", "hf-cb", "no-prefix-cache"})
    if unknown:
        raise ValueError(f"--baseline: unknown {', '.join(unknown)}; expected hf, hf-static, hf-cb or no-prefix-cache")
    options = BenchOptions(
        out=args.out, model=args.model, endpoints=args.endpoint, served_model=args.served_model,
        api_key=args.api_key, backend=args.backend, engine=engine, baselines=baselines, clients=clients,
        rates=args.rate, requests=args.requests, warmup=args.warmup, prompt_len=args.prompt_len,
        gen_len=args.gen_len, variance=args.variance, shared_prefix_len=args.shared_prefix_len,
        prompts_file=args.prompts_file, tokenizer=args.tokenizer,
        max_len=args.max_len, send_ids=args.send_ids, seed=args.seed, sla_rates=args.sla_rates,
        goodput=metrics.parse_goodput(args.goodput), hf_device=args.hf_device, hf_dtype=args.hf_dtype,
        hf_batch_size=args.hf_batch_size, plots=args.plots, progress=args.progress,
        request_settings=_request_settings(args),
    )
    results = run(options)
    summary = {name: [{k: p.get(k) for k in ("mode", "clients", "rate", "request_throughput", "output_throughput")
                       if p.get(k) is not None} for p in system.get("points", [])] or system
               for name, system in results["systems"].items()}
    print(json.dumps(summary, indent=1), file=sys.stderr)
    workload = results.get("workload", {})
    if workload.get("clipped_requests"):
        print(f"note: {workload['clipped_requests']} of {workload['requests_per_point']} requests were shortened to fit "
              f"the model's max length of {workload['max_len']} tokens (asked: prompts ~{args.prompt_len}, "
              f"generations ~{args.gen_len}); results.json lists the lengths sent", file=sys.stderr)
    print(f"{args.out}/results.json")
    failed = [name for name, system in results["systems"].items() if "error" in system]
    for name in failed:
        print(f"error: {name}: {results['systems'][name]['error']}", file=sys.stderr)
    return 1 if failed else 0


def _request_settings(args: argparse.Namespace):
    """RequestSettings from the request flags; None when none was given (each system's default)."""
    from splitfuse.bench.clients import RequestSettings

    given = (args.temperature, args.top_p, args.ignore_eos, args.min_tokens, args.extra_body)
    if all(value is None for value in given):
        return None
    return RequestSettings(temperature=args.temperature, top_p=args.top_p, ignore_eos=bool(args.ignore_eos),
                           min_tokens=bool(args.min_tokens), extra_body=args.extra_body or {})
