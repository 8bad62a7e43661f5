"""FP8 weights: transformers' fine-grained `fp8` checkpoints (block-wise weight_scale_inv, as
Qwen3-FP8 ships) load with no flag and match transformers loading the same directory, and
quantization="fp8" quantizes a float model at load (per channel, weight-only)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import splitfuse
from splitfuse.backends import Backend, create_backend, torch_ops
from splitfuse.backends.cpu import CpuBackend
from splitfuse.cli import main
from splitfuse.models.loader import ModelLoadError
from splitfuse.quant import QuantizedWeight, dequantize_model, quantize, quantize_model, weight_bytes
from splitfuse.quant.activations import InputQuantizer
from splitfuse.testing.parity import hf_greedy, make_prompts, mismatch
from splitfuse.testing.tiny_model import make_tiny_model

FP8_MAX = 448.0
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = {"qkv": LINEARS[:3], "o": LINEARS[3:4], "gate_up": LINEARS[4:6], "down": LINEARS[6:]}
PROMPTS = [make_prompts()[i] for i in (0, 2, 3, 5)]  # 1, 7, 33 and 129 tokens
NEW_TOKENS = 8


def fp8_block_quantize(weight: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (float8_e4m3fn weight, float32 weight_scale_inv [ceil(N/bn), ceil(K/bk)]), one
    max-abs scale per block (the last blocks may be partial); block None: one scale for the tensor."""
    w = weight.float()
    N, K = w.shape
    bn, bk = block or (N, K)
    padded = torch.zeros(math.ceil(N / bn) * bn, math.ceil(K / bk) * bk)
    padded[:N, :K] = w
    blocks = padded.unflatten(0, (-1, bn)).unflatten(2, (-1, bk))  # [N/bn, bn, K/bk, bk]
    scale = (blocks.abs().amax((1, 3)) / FP8_MAX).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(2).flatten(0, 1)[:N, :K].contiguous(), scale if block else scale.reshape(())


def write_fp8_checkpoint(source: Path, target: Path, block: list[int] | None, config: dict | None = None) -> Path:
    """Copy `source` to `target` with every decoder linear layer stored as transformers' FP8 layout."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    for name in [n for n in tensors if n.removesuffix(".weight").endswith(LINEARS)]:
        module = name.removesuffix(".weight")
        tensors[name], tensors[f"{module}.weight_scale_inv"] = fp8_block_quantize(tensors[name], block)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    model_config = json.loads((target / "config.json").read_text())
    model_config["quantization_config"] = config or {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": block}
    (target / "config.json").write_text(json.dumps(model_config))
    return target


@pytest.fixture(scope="module")
def fp8_checkpoint(tiny_model_dir, tmp_path_factory):
    """Returns a function (block, arch) -> a tiny model as an `fp8` checkpoint with that
    weight_block_size (arch: "llama", or "qwen3" as Qwen3-FP8 with its per-head q/k norms)."""
    written: dict[tuple, Path] = {}

    def get(block: list[int] | None, arch: str = "llama") -> Path:
        key = (str(block), arch)
        if key not in written:
            source = (tiny_model_dir("llama") if arch == "llama"
                      else make_tiny_model(tmp_path_factory.mktemp(arch) / "float", arch))
            written[key] = write_fp8_checkpoint(Path(source), tmp_path_factory.mktemp("fp8") / "model", block)
        return written[key]

    return get


def _pipeline(path, **settings):
    return splitfuse.pipeline(path, backend="cpu", kv_cache_gib=0.01, **settings)


# [32, 32]: several whole blocks per matrix; [128, 128]: as Qwen3-FP8, larger than the tiny
# matrices; None: one scale per tensor. (Blocks that split a matrix unevenly, below, transformers
# 5.25 fails to dequantize.)
BLOCKS = [([32, 32], "llama"), ([128, 128], "llama"), (None, "llama"), ([32, 32], "qwen3")]


def _hf_fp8(path: Path, monkeypatch):
    """transformers on an fp8 checkpoint. Without an FP8 GPU it dequantizes the weights at load (to
    float32 here) and runs dense matmuls. Its check for the accelerate package (not installed here) is
    lifted: that dequantizing route does not use it."""
    from transformers.quantizers import quantizer_finegrained_fp8

    monkeypatch.setattr(quantizer_finegrained_fp8, "is_accelerate_available", lambda: True)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("block,arch", BLOCKS, ids=[f"{a}-{b}" for b, a in BLOCKS])
@torch.no_grad()
def test_fp8_checkpoint_loads_as_transformers_dequantizes_it_and_generates_its_tokens(fp8_checkpoint, block, arch,
                                                                                     caplog, monkeypatch):
    path = fp8_checkpoint(block, arch)
    with caplog.at_level(logging.INFO, logger="splitfuse"):
        pipe = _pipeline(path)
    assert "fp8 checkpoint: 8 quantized matrices (from 14 layers)" in caplog.text
    assert pipe.engine.settings.quantization == ("fp8 (per tensor)" if block is None else
                                                 f"fp8 (block {block[0]}x{block[1]})")
    hf = _hf_fp8(path, monkeypatch)
    weights = pipe.engine.model.weights
    for layer in range(2):
        for ours, modules in FUSED.items():
            weight = weights[f"layers.{layer}.{ours}.weight"]
            assert isinstance(weight, QuantizedWeight) and weight.format == "fp8", f"layer {layer} {ours}"
            expected = torch.cat([hf.model.layers[layer].get_submodule(m).weight for m in modules])
            assert torch.equal(weight.dequantize(torch.float32), expected.float()), f"layer {layer} {ours}"
    responses = pipe(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)
    problems = [mismatch(hf, p, r.token_ids, hf_greedy(hf, p, NEW_TOKENS)) for p, r in zip(PROMPTS, responses)]
    problems = [p for p in problems if p]
    assert not problems, f"fp8 block {block}: greedy output differs from transformers'\n" + "\n".join(problems)


def test_partial_blocks_dequantize_exactly_and_generate_as_the_dequantized_model(fp8_checkpoint, tiny_model_dir):
    """[48, 48] blocks split 64 and 128 unevenly: the last block of a row or column is partial."""
    pipe = _pipeline(fp8_checkpoint([48, 48]))
    source = load_file(Path(tiny_model_dir("llama")) / "model.safetensors")
    weight = pipe.engine.model.weights["layers.1.down.weight"]
    q, scale = fp8_block_quantize(source["model.layers.1.mlp.down_proj.weight"], [48, 48])
    assert scale.shape == (2, 3) and weight.scales.shape == (64, 3) and weight.group_size == 48
    expected = q.float() * scale.repeat_interleave(48, 0)[:64].repeat_interleave(48, 1)[:, :128]
    assert torch.equal(weight.dequantize(torch.float32), expected)
    reference = _pipeline(fp8_checkpoint([48, 48]))
    dequantize_model(reference.engine.model)
    ours = pipe(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    theirs = reference(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in ours] == [t.token_ids for t in theirs]


BASE = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
UP = "model.layers.1.mlp.up_proj"
REFUSED = [
    # (config, tensors edit, message)
    ({**BASE, "activation_scheme": "static"}, None,
     "quantization_config.activation_scheme='static' (fp8) is not supported; expected 'dynamic'"),
    ({**BASE, "scale_fmt": "ue8m0"}, None, "quantization_config.scale_fmt='ue8m0' (fp8) is not supported"),
    ({**BASE, "weight_block_size": [32]}, None,
     "weight_block_size=[32] (fp8) is not supported; expected two positive"),
    ({**BASE, "fmt": "e5m2"}, None, "quantization_config.fmt='e5m2' (fp8) is not supported; expected 'e4m3'"),
    (BASE, lambda t: t.pop(f"{UP}.weight_scale_inv"), f"fp8 layer '{UP}' lacks {UP}.weight_scale_inv"),
    (BASE, lambda t: t.update({f"{UP}.weight_scale_inv": t[f"{UP}.weight_scale_inv"][:2]}),
     f"FP8 layer '{UP}': scale has shape (2, 2), expected (4, 2) for weight (128, 64) and blocks of [32, 32]"),
    ({**BASE, "weight_block_size": [64, 64]}, None, "and blocks of [64, 64]"),  # scales of 32x32 blocks
]


@pytest.mark.parametrize("config,edit,message", REFUSED, ids=[m[:50] for *_, m in REFUSED])
def test_unsupported_or_broken_fp8_checkpoints_are_refused_at_load(tiny_model_dir, tmp_path, config, edit, message):
    path = write_fp8_checkpoint(Path(tiny_model_dir("llama")), tmp_path / "model", [32, 32], config)
    if edit:
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file({n: t.contiguous() for n, t in tensors.items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        _pipeline(path)


# ---- quantization="fp8": on the fly, per channel -------------------------------------------------
@pytest.mark.parametrize("N,K", [(33, 41), (1, 8), (64, 256)])
def test_fp8_round_trip_is_within_half_a_float8_step(N, K):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    w[0, :3] = 0.0
    q = quantize(w, "fp8")
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == (N, K) and q.scales.shape == (N, 1)
    assert q.group_size == K and q.zeros is None and q.input_quant is None
    scaled = w / q.scales  # what was rounded: |value| <= 448, 3 mantissa bits
    step = torch.exp2(torch.floor(torch.log2(scaled.abs().clamp_min(2.0 ** -6)))) / 8  # float8_e4m3fn spacing
    assert ((q.dequantize() - w).abs() <= step / 2 * q.scales * (1 + 1e-6)).all()
    assert (q.dequantize()[0, :3] == 0).all()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["float32", "bfloat16"])
def test_cpu_linear_with_fp8_weights_dequantizes_to_the_compute_dtype(dtype, tolerance):
    weight = quantize(torch.randn(48, 96, generator=torch.Generator().manual_seed(1)) * 0.1, "fp8")
    backend = CpuBackend()
    prepared = backend.prepare_linear_weight(weight)
    assert prepared is weight  # no CPU kernel takes float8: the portable layout is kept
    x, bias = torch.randn(2, 5, 96).to(dtype), torch.randn(48).to(dtype)
    expected = torch_ops.linear(x.float(), weight.dequantize(torch.float32), bias.float())
    torch.testing.assert_close(backend.linear(x, prepared, bias).float(), expected, rtol=tolerance, atol=tolerance)


def test_cuda_backend_under_the_interpreter_runs_fp8_and_w8a8_weights_as_the_cpu_does():
    backend, reference = create_backend("cuda"), CpuBackend()  # cuda: the Triton interpreter (tests/conftest.py)
    x, bias = torch.randn(7, 96, generator=torch.Generator().manual_seed(3)), torch.randn(48)
    weight = quantize(torch.randn(48, 96, generator=torch.Generator().manual_seed(4)) * 0.1, "fp8")
    for input_quant in (None, InputQuantizer("token"), InputQuantizer("group", group_size=32),
                        InputQuantizer("tensor", scale=0.01)):
        w = dataclasses.replace(weight, input_quant=input_quant)
        got = backend.linear(x.to(backend.device), backend.prepare_linear_weight(w.to(backend.device)),
                             bias.to(backend.device))
        torch.testing.assert_close(got.cpu(), reference.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_input_quantization_rounds_each_token_to_float8_on_its_own_scale():
    x = torch.tensor([[1.0, -0.5, 0.3, 0.0], [100.0, 3.0, -7.0, 0.01]])
    got = InputQuantizer("token")(x)
    scale = x.abs().amax(dim=1, keepdim=True) / FP8_MAX  # the largest |x| of a token maps to 448 exactly
    assert torch.equal(got, (x / scale).to(torch.float8_e4m3fn).float() * scale)
    assert got[0, 0] == 1.0 and got[1, 0] == 100.0 and got[0, 3] == 0.0
    assert torch.equal(InputQuantizer("tensor", scale=1.0)(torch.tensor([1000.0, 0.3])),
                       torch.tensor([448.0, 0.3]).to(torch.float8_e4m3fn).float())  # clamped to the range


def test_tiny_llama_quantized_to_fp8_at_load_matches_its_dequantized_weights(tiny_model_dir):
    path = tiny_model_dir("llama")
    pipe = _pipeline(path, quantization="fp8")
    weights = pipe.engine.model.weights
    assert sorted(n for n, w in weights.items() if isinstance(w, QuantizedWeight)) == sorted(
        f"layers.{i}.{m}.weight" for i in range(2) for m in ("qkv", "o", "gate_up", "down"))
    assert all(w.format == "fp8" for w in weights.values() if isinstance(w, QuantizedWeight))
    assert pipe.engine.settings.quantization == "fp8"
    reference = _pipeline(path)
    assert weight_bytes(weights) < weight_bytes(reference.engine.model.weights)
    quantize_model(reference.engine.model, Backend(), "fp8")
    dequantize_model(reference.engine.model)
    ours = pipe(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    theirs = reference(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in ours] == [t.token_ids for t in theirs]


def test_fp8_from_the_command_line(tiny_model_dir, capsys):
    assert main(["generate", tiny_model_dir("llama"), "Hello", "--backend", "cpu", "--max-new-tokens", "3",
                 "--temperature", "0", "--ignore-eos", "--quantization", "fp8"]) == 0
    assert "3 tokens, finish_reason=length" in capsys.readouterr().err


def test_a_quantized_checkpoint_with_fp8_on_the_fly_is_refused(fp8_checkpoint):
    with pytest.raises(ModelLoadError, match=re.escape("quantization='fp8' was given for a checkpoint already "
                                                      "quantized (quantization_config.quant_method='fp8')")):
        _pipeline(fp8_checkpoint([32, 32]), quantization="fp8")
