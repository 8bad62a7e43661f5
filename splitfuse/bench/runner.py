"""`splitfuse bench`: one workload, every system, every load point; writes results.json and plots."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import json
import logging
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from splitfuse.bench import metrics, workloads
from splitfuse.bench.clients import FIXED_LENGTH_GREEDY, OpenAIClient, RequestSettings
from splitfuse.bench.load import System, closed_loop, open_loop
from splitfuse.bench.local_server import LocalServer


@dataclass
class BenchOptions:
    """Everything one benchmark run needs; the CLI fills it from flags."""

    out: str
    model: str | None = None
    endpoints: list[str] = field(default_factory=list)
    served_model: str | None = None
    api_key: str | None = None
    backend: str | None = None
    engine: dict = field(default_factory=dict)
    baselines: list[str] = field(default_factory=list)
    clients: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    rates: list[float] = field(default_factory=list)
    requests: int = 64
    warmup: int = 2
    prompt_len: int = 2600
    gen_len: int = 60
    variance: float = 0.3
    shared_prefix_len: int = 0  # every prompt starts with the same this many tokens
    prompts_file: str | None = None
    tokenizer: str | None = None
    max_len: int | None = None
    send_ids: bool | None = None
    seed: int = 0
    sla_rates: list[float] = field(default_factory=lambda: list(metrics.SLA_RATES))
    goodput: dict[str, float] = field(default_factory=dict)
    hf_device: str = "auto"
    hf_dtype: str = "auto"
    hf_batch_size: int = 32
    plots: bool = True
    progress: bool = True
    # what requests ask the servers; None: nothing for --endpoint servers (their defaults), greedy
    # and fixed lengths for splitfuse's own (as the HF baselines run)
    request_settings: RequestSettings | None = None


class RequestRejected(RuntimeError):
    """The server refused requests outright (a field it does not take): the run measures nothing."""


def _model_dir(options: BenchOptions) -> str:
    if options.model is not None:
        return options.model
    from splitfuse.data import default_model_dir

    return str(default_model_dir())


def _load_tokenizer(path: str | None):
    if path is None:
        return None
    from splitfuse.models.loader import load_tokenizer

    try:
        return load_tokenizer(Path(path))  # lengths are fitted to the model's max length here, not there
    except (OSError, ValueError):
        return None  # a tokenizer-free model: prompts stay token ids


def _model_limits(model_dir: str) -> tuple[int, int]:
    """(max length, vocab size) from a model directory's config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    return int(config.get("max_position_embeddings") or 4096), int(config["vocab_size"])


def hf_settings(options: BenchOptions) -> tuple[str, str]:
    """(device, dtype) of the HF baselines; auto: the device type splitfuse's backend runs on, and
    the engine's dtype (bfloat16 off the CPU)."""
    device = options.hf_device
    if device == "auto":
        from splitfuse.backends.selection import backend_class

        device = backend_class(options.backend).device_type()
    dtype = options.hf_dtype
    if dtype == "auto":
        dtype = options.engine.get("dtype") or ("bfloat16" if device != "cpu" else "float32")
        dtype = "float32" if dtype == "auto" else dtype
    return device, dtype


def _systems(options: BenchOptions, model_dir: str, workload: list[workloads.BenchRequest], send_ids: bool,
             notes: dict) -> list[System]:
    systems: list[System] = []
    if options.endpoints:
        settings = options.request_settings or RequestSettings()
        systems += [OpenAIClient(url, options.served_model, url, send_ids, options.api_key, settings=settings)
                    for url in options.endpoints]
    else:
        settings = options.request_settings or FIXED_LENGTH_GREEDY
        systems.append(LocalServer(model_dir, options.backend, options.engine, send_ids, settings=settings))
        if "no-prefix-cache" in options.baselines:  # the same server with prefix caching off
            systems.append(LocalServer(model_dir, options.backend, {**options.engine, "enable_prefix_caching": False},
                                       send_ids, name="splitfuse-no-prefix-cache", settings=settings))
    from splitfuse.bench import hf_baseline

    device, dtype = hf_settings(options)
    for name in options.baselines:
        if name in ("hf", "hf-static"):
            systems.append(hf_baseline.HFStatic(model_dir, device, dtype, options.hf_batch_size))
        if name in ("hf", "hf-cb"):
            missing = hf_baseline.continuous_batching_missing()
            if missing:
                notes["hf_cb"] = {"skipped": missing}
                continue
            context = max(len(r.prompt_ids) + r.gen_len for r in workload)
            most = max(options.clients + [options.requests if options.rates else 1])
            systems.append(hf_baseline.HFContinuous(model_dir, device, dtype,
                                                    options.engine.get("token_budget") or 768, context, most))
    return systems


def _points(options: BenchOptions) -> list[dict]:
    return ([{"mode": "closed", "clients": c} for c in options.clients]
            + [{"mode": "open", "rate": r} for r in options.rates])


async def _run_system(system: System, options: BenchOptions, workload, warm, bar: tqdm) -> dict:
    try:
        await system.start()
        if warm:
            records, _ = await closed_loop(system, warm, max(1, min(len(warm), max(options.clients or [1]))))
            check_served(records, "warmup")
        points = []
        for point in _points(options):
            label = f"clients={point['clients']}" if point["mode"] == "closed" else f"rate={point['rate']:g}/s"
            bar.set_description(f"{system.name} {label}")
            if point["mode"] == "closed":
                records, duration = await closed_loop(system, workload, point["clients"], bar)
            else:
                records, duration = await open_loop(system, workload, point["rate"], options.seed, bar)
            check_served(records, label)
            points.append({**point, **metrics.point_metrics(records, duration, tuple(options.sla_rates),
                                                            options.goodput)})
        settings = getattr(system, "settings", None)  # the HF baselines are always greedy, fixed lengths
        return {"points": points, **({"request_settings": asdict(settings)} if settings is not None else {})}
    finally:
        await system.close()


def check_served(records: list[metrics.RequestRecord], label: str) -> None:
    """Raise when the server rejected a request or none completed: such a point measures nothing."""
    rejected = [r for r in records if r.rejected]
    if rejected:
        raise RequestRejected(f"{label}: the server rejected {len(rejected)} of {len(records)} requests; the "
                              f"first: {rejected[0].error} (see --temperature, --top-p, --ignore-eos, --min-tokens, "
                              "--extra-body for what is sent)")
    if not any(r.ok for r in records):
        raise RuntimeError(f"{label}: no request completed; the first error: {records[0].error}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command() -> str:
    argv = sys.argv[1:]
    return "splitfuse " + shlex.join(argv) if argv[:1] == ["bench"] else shlex.join(sys.argv)


def _machine() -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]  # noise from other processes
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


async def run_async(options: BenchOptions) -> dict:
    """Run the benchmark and return the results dict (also written to OUT/results.json)."""
    if not options.clients and not options.rates:
        raise ValueError("give at least one load point: --clients and/or --rate")
    if options.requests < 1:
        raise ValueError(f"--requests must be at least 1, got {options.requests}")
    model_dir = options.model
    if model_dir is None and (not options.endpoints or options.baselines):
        model_dir = _model_dir(options)
    if model_dir is not None and not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"MODEL {model_dir}: no config.json there; give a Hugging Face model directory")
    tokenizer_dir = options.tokenizer or model_dir or _model_dir(options)
    tokenizer = _load_tokenizer(tokenizer_dir)
    max_len = vocab = None
    for d in (model_dir, tokenizer_dir):
        if d and (Path(d) / "config.json").is_file():
            max_len, vocab = _model_limits(d)
            break
    if tokenizer is not None:
        vocab = len(tokenizer)  # ids past the tokenizer (padded embeddings) could not be sent as text
    if options.endpoints and options.max_len is None:
        served = await OpenAIClient(options.endpoints[0], options.served_model, "", True, options.api_key).model_info()
        max_len = served.get("max_model_len") or max_len
    max_len = options.max_len or options.engine.get("max_model_len") or max_len
    if max_len is None or vocab is None:
        raise ValueError("cannot tell the model's max length or vocabulary: give --max-len and --tokenizer DIR")
    send_ids = options.send_ids if options.send_ids is not None else not options.endpoints
    total = options.requests + options.warmup
    if options.prompts_file:
        all_requests = workloads.from_file(options.prompts_file, options.gen_len, options.variance, max_len,
                                           options.seed, tokenizer)
        all_requests = (all_requests * (total // len(all_requests) + 1))[:total]
    else:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        all_requests = workloads.synthetic(total, options.prompt_len, options.gen_len, options.variance, max_len,
                                           vocab, options.seed, special, options.shared_prefix_len)
    if not send_ids:
        for r, text in zip(all_requests, workloads.as_text(all_requests, tokenizer)):
            r.prompt_text = text
    warm, workload = all_requests[:options.warmup], all_requests[options.warmup:]

    notes: dict = {}
    systems = _systems(options, model_dir, all_requests, send_ids, notes)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "machine": _machine(),
        "units": {"latency": "s", "throughput": "per s"},
        "definitions": metrics.__doc__.strip(),
        "workload": {
            "source": options.prompts_file or "random token ids", "requests_per_point": len(workload),
            "warmup_requests": len(warm), "prompt_len": options.prompt_len, "gen_len": options.gen_len,
            "variance": options.variance, "shared_prefix_len": options.shared_prefix_len, "max_len": max_len,
            "seed": options.seed,
            "prompt_tokens": [len(r.prompt_ids) for r in workload], "gen_tokens": [r.gen_len for r in workload],
            "prompts_sent_as": "token ids" if send_ids else "text",
            # requests whose drawn prompt or generation length did not fit max_len and was shortened
            "clipped_requests": sum(r.clipped for r in workload),
        },
        "options": {k: v for k, v in asdict(options).items() if k not in ("api_key", "progress")},
        "systems": dict(notes),
    }
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(systems) * len(_points(options)) * len(workload), unit="req", disable=not options.progress)
    try:
        for system in systems:
            try:
                results["systems"][system.name] = await _run_system(system, options, workload, warm, bar)
            except Exception as exc:  # noqa: BLE001 - one broken system must not lose the others' results
                results["systems"][system.name] = {"error": f"{type(exc).__name__}: {exc}"}
            _free_memory()
            (out / "results.json").write_text(json.dumps(results, indent=2))
    finally:
        bar.close()
    if options.plots:
        try:
            from splitfuse.bench.plots import write_plots
        except ImportError as exc:  # the measurements stand without their pictures
            results["plots_error"] = f"no plots: {exc}"
        else:
            results["plots"] = [p.name for p in write_plots(results, out)]
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _free_memory() -> None:
    """Between systems: a GPU must not hold one system's weights and cache while the next loads."""
    from splitfuse.bench import hf_baseline

    hf_baseline._MODELS.clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(options: BenchOptions) -> dict:
    with quiet_third_party_logs():
        return asyncio.run(run_async(options))


@contextlib.contextmanager
def quiet_third_party_logs():
    """The benchmark's output is its own progress and summary: transformers' advice (length
    warnings, its continuous batching's psutil complaint) is silenced for the run."""
    import transformers

    loggers = [logging.getLogger(name) for name in ("ContinuousBatchingLogger", "transformers")]
    levels = [logger.level for logger in loggers]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
