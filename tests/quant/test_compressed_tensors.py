"""compressed-tensors checkpoints, written here by the compressed-tensors library's own ModelCompressor
from a tiny random llama, load with no flag. Each quantized matrix dequantizes to what the library
decompresses, each linear layer computes what transformers' layer computes (activation quantization
included), and greedy tokens equal transformers loading the same directory and, for weight-only
schemes, the same engine holding the dequantized matrices as float32 tensors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import splitfuse
from splitfuse.backends.cpu import CpuBackend
from splitfuse.models.loader import ModelLoadError
from splitfuse.quant import QuantizedWeight, dequantize_model
from splitfuse.testing.parity import hf_greedy, make_prompts, mismatch
from splitfuse.testing.tiny_model import make_tiny_model

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

FP8 = dict(num_bits=8, type="float", symmetric=True)
FP8_TOKEN = QuantizationArgs(**FP8, strategy="token", dynamic=True)
INT4_GROUP32 = QuantizationArgs(num_bits=4, strategy="group", group_size=32)
INT8_GROUP32 = QuantizationArgs(num_bits=8, strategy="group", group_size=32)  # llm-compressor's W8A16, per group


def _one_group(weights: QuantizationArgs, inputs: QuantizationArgs | None = None) -> dict[str, QuantizationScheme]:
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)}


# name -> (config groups, format forced on the compressor or None to let it infer each layer's)
SCHEMES = {
    "fp8-w8a16-channel": (_one_group(QuantizationArgs(**FP8, strategy="channel")), None),
    "fp8-w8a16-tensor": (_one_group(QuantizationArgs(**FP8, strategy="tensor")), None),
    "fp8-w8a8-dynamic-token": (_one_group(QuantizationArgs(**FP8, strategy="channel"), FP8_TOKEN), None),
    "fp8-w8a8-static-tensor": (_one_group(QuantizationArgs(**FP8, strategy="tensor"),
                                          QuantizationArgs(**FP8, strategy="tensor", dynamic=False)), None),
    "fp8-block-w8a8-dynamic-group": (_one_group(
        QuantizationArgs(**FP8, strategy="block", block_structure=[32, 32]),
        QuantizationArgs(**FP8, strategy="group", group_size=32, dynamic=True)), None),
    "int8-w8a16-channel-naive": (_one_group(QuantizationArgs(num_bits=8, strategy="channel")), "naive-quantized"),
    "int8-w8a16-channel-packed": (_one_group(QuantizationArgs(num_bits=8, strategy="channel")), "pack-quantized"),
    "int8-w8a16-group32-naive": (_one_group(INT8_GROUP32), "naive-quantized"),
    "int8-w8a16-group32-packed": (_one_group(INT8_GROUP32), "pack-quantized"),
    "int4-w4a16-group32": (_one_group(INT4_GROUP32), None),
    "int4-w4a16-group32-asymmetric": (_one_group(QuantizationArgs(num_bits=4, strategy="group", group_size=32,
                                                                  symmetric=False)), None),
    # two groups chosen by regex targets, each with its own format ("mixed-precision")
    "mixed-fp8-w8a8-attention-int4-mlp": ({
        "attention": QuantizationScheme(targets=["re:.*self_attn.*"], weights=QuantizationArgs(**FP8, strategy="channel"),
                                        input_activations=FP8_TOKEN),
        "mlp": QuantizationScheme(targets=["re:.*mlp.*"], weights=INT4_GROUP32)}, None),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = {"qkv": LINEARS[:3], "o": LINEARS[3:4], "gate_up": LINEARS[4:6], "down": LINEARS[6:]}
PROMPTS = [make_prompts()[i] for i in (0, 2, 3, 5)]  # 1, 7, 33 and 129 tokens
NEW_TOKENS = 8


def _minmax(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """What a min-max observer sees for `args.strategy`, shaped like the scale it calibrates."""
    if args.strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    if args.strategy == "channel":
        return weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    if args.strategy == "group":
        groups = weight.unflatten(1, (-1, args.group_size))
        return groups.amin(2), groups.amax(2)
    bn, bk = args.block_structure
    blocks = weight.unflatten(0, (-1, bn)).unflatten(2, (-1, bk))  # [N/bn, bn, K/bk, bk]
    return blocks.amin((1, 3)), blocks.amax((1, 3))


@torch.no_grad()
def write_compressed_tensors_checkpoint(source: Path, target: Path, config_groups: dict[str, QuantizationScheme],
                                        format: str | None = None) -> Path:
    """Quantize the float model at `source` with compressed-tensors (min-max scales; static input
    scales from a calibration pass) and save it compressed, as llm-compressor does, to `target`."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    apply_quantization_config(model, QuantizationConfig(config_groups=config_groups, ignore=["lm_head"]))
    seen: dict[torch.nn.Module, float] = {}

    def record(module, args):
        seen[module] = max(seen.get(module, 0.0), args[0].abs().max().item())

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if hasattr(m, "input_scale")]
    model(torch.tensor([make_prompts(seed=1)[4]]))  # calibration: a 64-token prompt
    for hook in hooks:
        hook.remove()
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        weights, inputs = scheme.weights, scheme.input_activations
        scale, zero_point = calculate_qparams(*_minmax(module.weight, weights), weights)
        module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
        if module in seen:
            absmax = torch.tensor([seen[module]])
            module.input_scale.copy_(calculate_qparams(-absmax, absmax, inputs)[0].reshape(module.input_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=format)
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    return target


@pytest.fixture(scope="module")
def hf_oracle(checkpoint):
    """Returns a function scheme name -> transformers' model of its checkpoint, loaded once."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = _hf(checkpoint(name), dequantize=name in HF_DEQUANTIZES_AT_LOAD)
        return loaded[name]

    return get


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    """Returns a function scheme name -> its compressed-tensors checkpoint, written once."""
    written: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in written:
            written[name] = write_compressed_tensors_checkpoint(
                Path(tiny_model_dir("llama")), tmp_path_factory.mktemp(name), *SCHEMES[name])
        return written[name]

    return get


# transformers 5.25 with compressed-tensors 0.20 cannot load asymmetric pack-quantized checkpoints by
# its default route (the packed zero points' shape mismatches the parameter it makes for them): the
# oracle for those dequantizes at load (a route that fails on mixed-precision checkpoints instead).
HF_DEQUANTIZES_AT_LOAD = {"int4-w4a16-group32-asymmetric"}


@torch.no_grad()
def _hf(path: Path, dequantize: bool):
    """transformers on the checkpoint: by default compressed-tensors' quantized forward (decompressed
    weights; for W8A8 each linear layer's input quantize-dequantized as the scheme says)."""
    # (an explicit quantization_config=None would make transformers load the checkpoint as unquantized)
    settings = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **settings).eval()
    model(torch.tensor([[1]]))  # the default route decompresses the weights on the first forward
    return model


def _pipeline(path):
    return splitfuse.pipeline(path, backend="cpu", kv_cache_gib=0.01)


def _hf_linears(hf_model, layer: int) -> dict[str, torch.nn.Module]:
    block = hf_model.model.layers[layer]
    return {m: block.get_submodule(m) for m in LINEARS}


@pytest.mark.parametrize("name", list(SCHEMES))
@torch.no_grad()
def test_checkpoint_loads_as_the_library_decompresses_it_and_each_linear_matches_transformers(checkpoint, hf_oracle,
                                                                                              name):
    path = checkpoint(name)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    weights = _pipeline(path).engine.model.weights
    hf = hf_oracle(name)  # its weights: compressed-tensors' own decompression, dense float32
    backend = CpuBackend()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for layer in range(2):
        for ours, modules in FUSED.items():
            weight = weights[f"layers.{layer}.{ours}.weight"]
            assert isinstance(weight, QuantizedWeight), f"layer {layer} {ours}"
            expected = torch.cat([_hf_linears(hf, layer)[m].weight for m in modules])
            # exact but for the cpu int4 kernel's layout, which dequantizes as (q - 8) * s + (8 - z) * s
            torch.testing.assert_close(weight.dequantize(torch.float32), expected, rtol=1e-6, atol=1e-7)
            inputs = x if ours != "down" else torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
            # [batch 1, tokens, features]: compressed-tensors takes "token" scales over every dimension but
            # the first two, so a 2-D input would get one scale for all of it
            expected = torch.cat([_hf_linears(hf, layer)[m](inputs[None])[0] for m in modules], dim=-1)
            # transformers' layer: decompressed weights, inputs quantized-dequantized as the scheme says
            torch.testing.assert_close(backend.linear(inputs, weight), expected, rtol=1e-5, atol=1e-5)
    assert all(isinstance(weights[n], torch.Tensor) for n in ("embed_tokens.weight", "lm_head.weight"))


# each weight format and each input quantization once (every scheme's layers are compared above)
@pytest.mark.parametrize("name", ["fp8-w8a16-channel", "fp8-w8a8-dynamic-token", "fp8-w8a8-static-tensor",
                                  "fp8-block-w8a8-dynamic-group", "int8-w8a16-channel-naive",
                                  "int8-w8a16-group32-packed", "int4-w4a16-group32",
                                  "mixed-fp8-w8a8-attention-int4-mlp"])
def test_greedy_tokens_equal_transformers_on_the_same_checkpoint(checkpoint, hf_oracle, name):
    path = checkpoint(name)
    hf = hf_oracle(name)
    responses = _pipeline(path)(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)  # HF stops at EOS too
    problems = [mismatch(hf, p, r.token_ids, hf_greedy(hf, p, NEW_TOKENS)) for p, r in zip(PROMPTS, responses)]
    problems = [p for p in problems if p]
    assert not problems, f"{name}: greedy output differs from transformers'\n" + "\n".join(problems)


# one scheme per weight format (FP8, INT8, INT4): whole-model runs cost seconds each
@pytest.mark.parametrize("name", ["fp8-w8a16-channel", "int8-w8a16-channel-packed", "int4-w4a16-group32-asymmetric"])
def test_weight_only_greedy_tokens_equal_the_dequantized_float32_model(checkpoint, name):
    path = checkpoint(name)
    reference = _pipeline(path)
    dequantize_model(reference.engine.model)
    assert not any(isinstance(w, QuantizedWeight) for w in reference.engine.model.weights.values())
    ours = _pipeline(path)(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    theirs = reference(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
    for prompt, o, r in zip(PROMPTS, ours, theirs):
        for i, (a, b) in enumerate(zip(o.token_ids, r.token_ids)):
            if a != b:  # a near-tie of the reference's own top-2 is the only accepted divergence
                top = r.logprobs[i].top
                assert a in top and abs(top[a] - top[b]) < 1e-3, f"{name}: prompt of {len(prompt)} diverges at {i}"
                break


def test_each_layer_takes_the_config_group_its_name_matches(checkpoint):
    path = checkpoint("mixed-fp8-w8a8-attention-int4-mlp")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    pipe = _pipeline(path)
    assert pipe.engine.settings.quantization == ("compressed-tensors (fp8 channel, input fp8 token; "
                                                 "int4 group 32)")
    weights = pipe.engine.model.weights
    for layer in range(2):
        for ours in ("qkv", "o"):
            weight = weights[f"layers.{layer}.{ours}.weight"]
            assert weight.format == "fp8" and weight.input_quant.strategy == "token"
        for ours in ("gate_up", "down"):
            weight = weights[f"layers.{layer}.{ours}.weight"]
            assert weight.format == "int4" and weight.group_size == 32 and weight.input_quant is None


def test_a_mixture_of_experts_checkpoint_generates_as_transformers(tmp_path):
    """transformers' Qwen2-MoE keeps its routed experts as fused 3-D tensors, not Linear layers, so
    compressed-tensors quantizes attention and the shared expert; the routed experts stay float."""
    source = make_tiny_model(tmp_path / "float", "qwen2_moe")
    path = write_compressed_tensors_checkpoint(source, tmp_path / "fp8", *SCHEMES["fp8-w8a8-dynamic-token"])
    pipe = _pipeline(path)
    weights = pipe.engine.model.weights
    assert isinstance(weights["layers.0.shared.gate_up.weight"], QuantizedWeight)
    assert isinstance(weights["layers.0.experts.gate_up"], torch.Tensor)
    hf = _hf(path, dequantize=False)
    prompts = PROMPTS[:3]
    responses = pipe(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
    problems = [mismatch(hf, p, r.token_ids, hf_greedy(hf, p, NEW_TOKENS)) for p, r in zip(prompts, responses)]
    assert not [p for p in problems if p], problems


def test_w8a8_quantizes_the_activations(checkpoint):
    """The same FP8 weights with and without the per-token input quantization give different
    outputs: the activation quantization is applied, not dropped."""
    weight = _pipeline(checkpoint("fp8-w8a8-dynamic-token")).engine.model.weights["layers.0.qkv.weight"]
    assert weight.input_quant is not None and weight.input_quant.strategy == "token"
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with_input_quant = CpuBackend().linear(x, weight)
    weight_only = x @ weight.dequantize(torch.float32).T
    assert not torch.allclose(with_input_quant, weight_only, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(with_input_quant, weight_only, rtol=0.1, atol=0.1)  # FP8 rounding: ~2^-4


# ---- refused at load, with the field and what is supported ------------------------------------------
def _edit_config(path: Path, target: Path, edit) -> Path:
    shutil.copytree(path, target)
    config = json.loads((target / "config.json").read_text())
    edit(config["quantization_config"])
    (target / "config.json").write_text(json.dumps(config))
    return target


def _edit_tensors(path: Path, target: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file({name: t.contiguous() for name, t in tensors.items()}, target / "model.safetensors",
              metadata={"format": "pt"})
    return target


def _group(config: dict) -> dict:
    return config["config_groups"]["group_0"]


Q = "model.layers.1.mlp.up_proj"
K = "model.layers.0.self_attn.k_proj"
REFUSED = [
    # (scheme written, what is changed, message)
    ("fp8-w8a16-channel", ("config", lambda c: c.update(quantization_status="frozen")),
     "quantization_status='frozen' (compressed-tensors) is not supported; expected 'compressed'"),
    ("fp8-w8a16-channel", ("config", lambda c: _group(c)["weights"].update(num_bits=4)),
     "weights={'type': 'float', 'num_bits': 4} (compressed-tensors) is not supported"),
    ("fp8-w8a16-channel", ("config", lambda c: _group(c).update(format="marlin-24")),
     "format='marlin-24' (compressed-tensors) is not supported"),
    ("int8-w8a16-channel-packed", ("config", lambda c: _group(c)["weights"].update(
        strategy="block", block_structure=[32, 32])),
     "weights.strategy='block' (compressed-tensors) is not supported; expected one of ['tensor', 'channel', "
     "'group']"),
    ("fp8-w8a8-dynamic-token", ("config", lambda c: _group(c)["input_activations"].update(strategy="tensor")),
     "input_activations={'dynamic': True, 'strategy': 'tensor'} (compressed-tensors) is not supported"),
    ("int8-w8a16-channel-naive", ("config", lambda c: _group(c).update(input_activations={
        "num_bits": 8, "type": "int", "strategy": "token", "dynamic": True})),
     "INT8 activations are not supported"),
    ("fp8-w8a16-channel", ("config", lambda c: c.update(kv_cache_scheme={"num_bits": 8, "type": "float"})),
     "kv_cache_scheme={'num_bits': 8, 'type': 'float'} (compressed-tensors) is not supported; expected none"),
    ("int8-w8a16-channel-packed", ("config", lambda c: _group(c)["weights"].update(symmetric=False)),
     "weights.symmetric=False (compressed-tensors) is not supported; expected true for int8 weights"),
    ("int4-w4a16-group32", ("config", lambda c: _group(c)["weights"].update(actorder="group")),
     "weights.actorder='group' (compressed-tensors) is not supported"),
    ("fp8-w8a16-channel", ("tensors", lambda t: t.pop(f"{Q}.weight_scale")),
     f"compressed-tensors layer '{Q}' lacks {Q}.weight_scale"),
    ("int4-w4a16-group32", ("tensors", lambda t: t.pop(f"{Q}.weight_shape")),
     f"compressed-tensors layer '{Q}' lacks {Q}.weight_shape"),
    ("fp8-w8a8-static-tensor", ("tensors", lambda t: t.pop(f"{Q}.input_scale")),
     f"compressed-tensors layer '{Q}' lacks {Q}.input_scale"),
    ("fp8-w8a8-static-tensor", ("tensors", lambda t: t[f"{K}.input_scale"].mul_(2)),  # fused q/k/v: one input
     "differ in format, group_size, in_features or input quantization"),
    ("fp8-w8a16-channel", ("tensors", lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:100]})),
     f"FP8 layer '{Q}': scale has shape (100, 1), expected (128, 1) for weight (128, 64)"),
    ("int4-w4a16-group32", ("tensors", lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:, :1]})),
     f"layer '{Q}': weight_scale has shape (128, 1), expected (128, 2) for weight_shape [128, 64] and group_size 32"),
    ("int4-w4a16-group32", ("config", lambda c: _group(c)["weights"].update(group_size=48)),
     "group_size 48 does not divide its in_features"),
    ("int4-w4a16-group32", ("tensors", lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"][:, :4]})),
     f"layer '{Q}': weight_packed is torch.int32 (128, 4), expected int32 (128, 8) for weight_shape [128, 64]"),
    ("fp8-w8a16-channel", ("config", lambda c: c.update(quant_method="bitsandbytes")),
     "quant_method='bitsandbytes' is not supported; supported: GPTQ 4-bit"),
]


@pytest.mark.parametrize("name,change,message", REFUSED, ids=[m.split(";")[0][:60] for *_, m in REFUSED])
def test_unsupported_or_broken_checkpoints_are_refused_at_load_naming_what(checkpoint, tmp_path, name, change,
                                                                         message):
    kind, edit = change
    path = (_edit_config if kind == "config" else _edit_tensors)(checkpoint(name), tmp_path / "model", edit)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        _pipeline(path)


def test_the_refusal_of_an_unknown_method_lists_every_supported_one(checkpoint, tmp_path):
    path = _edit_config(checkpoint("fp8-w8a16-channel"), tmp_path / "model", lambda c: c.update(quant_method="hqq"))
    with pytest.raises(ModelLoadError) as error:
        _pipeline(path)
    words = ("GPTQ 4-bit", "AWQ 4-bit", "compressed-tensors: formats", "fp8: fine-grained")
    assert all(word in str(error.value) for word in words)
