"""Load a Hugging Face model directory: config.json, (sharded) safetensors, tokenizer,
generation_config.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitfuse.parallel.shard import SINGLE, Shard
from splitfuse.plugins.manager import get_plugin_manager
from splitfuse.quant.checkpoint import UnsupportedQuantization, load_quantized_weights, read_quantization_config
from splitfuse.quant.packed import Int4Checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLING_DEFAULT_KEYS = ("temperature", "top_k", "top_p")


class ModelLoadError(ValueError):
    """The model directory cannot be served: missing, malformed or unsupported."""


@dataclass
class LoadedModel:
    model: object
    tokenizer: object | None
    hf_config: object
    eos_token_ids: list[int]
    sampling_defaults: dict = field(default_factory=dict)  # from generation_config.json


def supported_architectures() -> list[str]:
    return get_plugin_manager().models().names()


def resolve_dtype(dtype: str, backend) -> torch.dtype:
    resolved = backend.default_dtype() if dtype == "auto" else DTYPES[dtype]
    if resolved not in backend.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        raise ModelLoadError(f"dtype {dtype!r} is not supported by the {backend.name} backend; use one of: {names}")
    return resolved


def load_model(path: str | Path, backend, dtype: str = "auto", max_model_len: int | None = None,
               trust_remote_code: bool = False, shard: Shard = SINGLE, quantization: str | None = None) -> LoadedModel:
    """Load the model (this rank's slices of it, with a tensor-parallel shard) onto the backend;
    `quantization`: the on-the-fly format the caller will apply (refused for a quantized checkpoint)."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist (give a local Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: is it a Hugging Face model directory?")
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ModelLoadError(
                f"{str(path)!r} needs Python code shipped with the model to load its config; run it only "
                "if you trust its source: trust_remote_code=True (--trust-remote-code)"
            ) from exc
        raise
    architectures = getattr(hf_config, "architectures", None) or []
    registry = get_plugin_manager().models()
    arch = next((a for a in architectures if a in registry), None)
    if arch is None:
        raise ModelLoadError(
            f"architecture {architectures or '(none given)'} is not supported; supported: "
            + ", ".join(registry.names())
        )
    quantized = _checkpoint_quantization(hf_config, quantization)
    files = _safetensors_files(path)
    limit = getattr(hf_config, "max_position_embeddings", None) or 4096
    if max_model_len and max_model_len > limit:
        raise ModelLoadError(
            f"max_model_len {max_model_len} is longer than the model's max_position_embeddings ({limit})"
        )
    max_model_len = max_model_len or limit
    model = registry.get(arch)(hf_config, backend, resolve_dtype(dtype, backend), max_model_len)
    if shard.size > 1:
        _shard_model(model, arch, shard)
    if quantized is not None:
        try:
            load_quantized_weights(model, _stream_tensors(files), quantized, backend)
        except UnsupportedQuantization as exc:
            raise ModelLoadError(str(exc)) from None
    else:
        model.load_weights(_stream_tensors(files, model.checkpoint_slice if shard.size > 1 else None))
    generation = _read_json(path / "generation_config.json")
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(path, trust_remote_code),
        hf_config=hf_config,
        eos_token_ids=_eos_ids(hf_config, generation),
        sampling_defaults=_sampling_defaults(generation),
    )


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ModelLoadError(
            f"{str(path)!r} holds only PyTorch .bin weights; splitfuse loads safetensors only. Convert with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelLoadError(f"{str(path)!r} has no *.safetensors weight files")


def _checkpoint_quantization(hf_config, quantization: str | None) -> Int4Checkpoint | None:
    """The checkpoint's quantization format (None: not quantized), or refuse what cannot be served."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    if not isinstance(config, dict):
        config = config.to_dict()
    method = config.get("quant_method")
    if quantization:
        raise ModelLoadError(f"quantization={quantization!r} was given for a checkpoint already quantized "
                             f"(quantization_config.quant_method={method!r}); leave quantization unset")
    try:
        return read_quantization_config(config)
    except UnsupportedQuantization as exc:
        raise ModelLoadError(str(exc)) from None


def _shard_model(model, arch: str, shard: Shard) -> None:
    """Make the model this rank's shard, or refuse clearly (a plugin model may not know sharding)."""
    if not hasattr(model, "set_shard"):
        raise ModelLoadError(f"tensor_parallel_size={shard.size}: {arch} does not support tensor parallelism; "
                             "use tensor_parallel_size=1")
    try:
        model.set_shard(shard)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def _stream_tensors(files: list[Path], checkpoint_slice=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint tensor; where `checkpoint_slice(name, shape)` gives
    Slices, only those are read from the file."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    total = sum(len(h.keys()) for h in handles)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=None, leave=False) as bar:
        for handle in handles:
            for name in handle.keys():
                index = None
                if checkpoint_slice is not None:
                    part = handle.get_slice(name)
                    index = checkpoint_slice(name, part.get_shape())
                yield name, handle.get_tensor(name) if index is None else index.read(part)
                bar.update(1)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The directory's tokenizer (None without tokenizer files), lengths left to the caller to check."""
    from transformers import AutoTokenizer

    has_files = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_files:
        return None
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # The engine checks lengths against max_model_len itself and says what to do; without this,
    # transformers warns "Token indices sequence length is longer than..." before that message.
    tokenizer.model_max_length = int(1e30)
    return tokenizer


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text()) if file.is_file() else {}


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_ids(hf_config, generation: dict) -> list[int]:
    """EOS ids from generation_config.json (Llama 3 lists several) and config.json together."""
    ids = _as_list(generation.get("eos_token_id")) + _as_list(getattr(hf_config, "eos_token_id", None))
    return sorted(set(ids))


def _sampling_defaults(generation: dict) -> dict:
    if not generation.get("do_sample", False):
        return {"temperature": 0.0}
    return {k: generation[k] for k in SAMPLING_DEFAULT_KEYS if generation.get(k) is not None}
