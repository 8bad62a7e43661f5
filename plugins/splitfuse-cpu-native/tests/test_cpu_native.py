"""cpu-native: registration and availability, its C++ ops against the cpu reference ops, and greedy
output token for token with Hugging Face transformers on tiny random models.

The first test that builds the backend compiles the C++ ops (tens of seconds, once per machine;
torch caches the build)."""

from __future__ import annotations

import random

import pytest
import torch

import splitfuse
from splitfuse.backends import Backend, BackendError, create_backend, list_backends, torch_ops
from splitfuse.backends.cpu import CpuBackend
from splitfuse.testing.parity import hf_greedy, mismatch
from splitfuse.testing.ragged import filled_cache, ragged_step
from splitfuse.testing.tiny_model import make_tiny_model

# the package must be installed (pip install ./plugins/splitfuse-cpu-native): its entry point is under test
pytest.importorskip("splitfuse_cpu_native", reason="splitfuse-cpu-native is not installed")
from splitfuse_cpu_native import CpuNativeBackend, build


pytestmark = pytest.mark.usefixtures("splitfuse_fresh_plugins")  # from splitfuse's pytest plugin


@pytest.fixture(scope="module")
def native():
    if build.unavailable_reason():
        pytest.fail(f"cpu-native cannot be built on this machine: {build.unavailable_reason()}")
    return CpuNativeBackend()


# ---- registration and availability ----------------------------------------------------------------
def test_registered_by_entry_point_and_named_only():
    info = next(i for i in list_backends() if i.name == "cpu-native")
    assert info.available and info.priority < CpuBackend.priority  # `auto` keeps the always-available cpu
    assert create_backend("auto").name != "cpu-native"
    backend = create_backend("cpu-native")
    assert isinstance(backend, CpuNativeBackend) and isinstance(backend, CpuBackend)
    assert backend.device == torch.device("cpu") and backend.describe().startswith("cpu-native (")


def test_written_for_backend_contract_v2():
    """It implements building blocks, so it registers as itself, not through the version-1 adapter."""
    from splitfuse.plugins import get_plugin_manager

    registry = get_plugin_manager().backends()
    assert registry.get("cpu-native") is CpuNativeBackend and "adapted" not in registry.source("cpu-native")
    assert CpuNativeBackend.attention is Backend.attention
    assert CpuNativeBackend.rotary_attention is Backend.rotary_attention


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-g++")
    assert build.unavailable_reason() == "no C++ compiler (g++): 'no-such-g++' is not on PATH; install g++ or set CXX"
    with pytest.raises(BackendError, match=r"backend 'cpu-native' is unavailable: no C\+\+ compiler \(g\+\+\)"):
        create_backend("cpu-native")
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(build, "_ninja_on_path", lambda: False)
    assert build.unavailable_reason().startswith("ninja is not installed (pip install ninja)")
    monkeypatch.setattr(build, "_failure", "CalledProcessError: ops.cpp:1: error")
    assert build.unavailable_reason() == "the C++ ops failed to build: CalledProcessError: ops.cpp:1: error"


def test_a_failed_build_is_an_error_not_a_fallback(monkeypatch):
    import torch.utils.cpp_extension

    def broken_load(**kwargs):
        raise RuntimeError("Error building extension 'splitfuse_cpu_native':\nops.cpp:7: error: 'x' was not declared")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    monkeypatch.setattr(build, "_failure", "")  # restored afterwards
    with pytest.raises(RuntimeError, match="cpu-native: building the C\\+\\+ ops failed .*'x' was not declared"):
        build.ops.__wrapped__()  # the uncached build
    assert build.unavailable_reason() == "the C++ ops failed to build: RuntimeError: ops.cpp:7: error: 'x' was not declared"
    with pytest.raises(BackendError, match="backend 'cpu-native' is unavailable: the C\\+\\+ ops failed to build"):
        create_backend("cpu-native")


# ---- ops against the reference ---------------------------------------------------------------------
STEPS = {
    # (context incl. new tokens, new tokens) per sequence: decodes, chunks over cached context, fresh prompts
    "mixed": [(9, 1), (13, 5), (3, 3), (40, 17), (1, 1)],
    "decodes": [(37, 1), (5, 1), (64, 1), (2, 1)],
    "long-chunk": [(70, 70), (90, 24)],
}


@pytest.mark.parametrize("step_name, block_size", [("mixed", 1), ("mixed", 4), ("decodes", 16), ("long-chunk", 16)])
@pytest.mark.parametrize("heads, head_dim", [((8, 2), 64), ((3, 3), 12)], ids=["gqa4-d64", "mha-d12"])
@pytest.mark.parametrize("window, softcap", [(None, None), (6, None), (None, 4.0), (20, 30.0)])
def test_paged_attention_fp32(native, step_name, block_size, heads, head_dim, window, softcap):
    """NaN in every slot no sequence owns: reading a wrong slot poisons the output."""
    step = ragged_step(STEPS[step_name], block_size, seed=block_size)
    H, Hkv = heads
    cache, _, _ = filled_cache(step, Hkv, head_dim)
    q = torch.randn(step.meta.num_tokens, H, head_dim)
    scale = head_dim ** -0.5
    out = native.paged_attention(q, cache, step.meta, scale, window, softcap)
    ref = torch_ops.paged_attention(q, cache, step.meta, scale, window, softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_half_precision(native, dtype):
    step = ragged_step(STEPS["mixed"], 4, seed=2)
    cache, _, _ = filled_cache(step, 2, 32, dtype)
    q = torch.randn(step.meta.num_tokens, 4, 32).to(dtype)
    out = native.paged_attention(q, cache, step.meta, 0.2, 8, None)
    assert out.dtype == dtype
    # fp32 softmax in both; the difference is the rounding of one bf16/fp16 output
    torch.testing.assert_close(out.float(), torch_ops.paged_attention(q, cache, step.meta, 0.2, 8).float(),
                               rtol=1e-2, atol=1e-2)


def test_ops_reject_bad_arguments(native):
    step = ragged_step([(5, 2)], 4)
    cache, _, _ = filled_cache(step, 2, 16)
    with pytest.raises(RuntimeError, match="does not match kv"):
        native._ops.paged_attention(torch.randn(2, 3, 16), cache, step.meta.query_start, step.meta.context_lens,
                                    step.meta.block_tables, 0.25, 0, 0.0)
    with pytest.raises(RuntimeError, match="position 40 is outside the cos/sin table of 32 positions"):
        native._ops.rotary(torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.tensor([3, 40]),
                           torch.randn(32, 16), 16, False)
    with pytest.raises(RuntimeError, match="query_start must be a contiguous int32 CPU tensor"):
        native._ops.paged_attention(torch.randn(2, 4, 16), cache, step.meta.query_start.long(),
                                    step.meta.context_lens, step.meta.block_tables, 0.25, 0, 0.0)


def test_rms_norm_with_residual(native):
    ref = CpuBackend()
    for shape in [(5, 41), (3, 256), (1, 8)]:
        x, r, w = torch.randn(shape), torch.randn(shape), torch.randn(shape[-1])
        for got, want in zip(native.rms_norm(x, w, 1e-6, r), ref.rms_norm(x, w, 1e-6, r)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    x, w = torch.randn(4, 16), torch.randn(16)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), rtol=0, atol=0)  # reference op


@pytest.mark.parametrize("rotary_dim, interleaved", [(None, False), (8, True), (8, False)])
def test_rotary_and_fused_cache_write(native, rotary_dim, interleaved):
    """Rotary alone is bit-identical to the reference in fp32; fused with the cache write, every
    cache slot and the attention output match too (GQA, q and k as views of one qkv projection)."""
    specs = [(9, 1), (13, 5), (3, 3)]
    H, Hkv, D = 4, 2, 12
    R = rotary_dim or D
    step = ragged_step(specs, 4, seed=3, spare_blocks=2)
    meta = step.meta
    gen = torch.Generator().manual_seed(7)
    cache = torch.full((2, step.num_blocks, 4, Hkv, D), float("nan"))
    for (ctx, new), seq_slots in zip(specs, step.slots):  # earlier steps' keys
        old = torch.tensor(seq_slots[: ctx - new], dtype=torch.long)
        torch_ops.write_kv(cache, torch.randn(len(old), Hkv, D, generator=gen),
                           torch.randn(len(old), Hkv, D, generator=gen), old)
    ref_cache = cache.clone()
    qkv = torch.randn(meta.num_tokens, (H + 2 * Hkv) * D, generator=gen)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(-1, H, D), k.view(-1, Hkv, D), v.view(-1, Hkv, D)
    cos_sin = torch_ops.build_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, R, 2) / R), 32)
    for got, want in zip(native.rotary(q, k, meta.positions, cos_sin, rotary_dim, interleaved),
                         torch_ops.rotary(q, k, meta.positions, cos_sin, rotary_dim, interleaved)):
        assert torch.equal(got, want)
    scale = D ** -0.5
    ref = Backend.rotary_attention(CpuBackend(), q, k, v, meta.positions, cos_sin, ref_cache, meta, scale,
                                   rotary_dim=rotary_dim, interleaved=interleaved)
    out = native.rotary_attention(q, k, v, meta.positions, cos_sin, cache, meta, scale, rotary_dim=rotary_dim,
                                  interleaved=interleaved)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.isnan(), ref_cache.isnan())
    assert torch.equal(cache[~cache.isnan()], ref_cache[~ref_cache.isnan()])


# ---- end to end against Hugging Face -----------------------------------------------------------------
TINY_MODELS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 24}),  # a window shorter than the prompts
    "qwen2": ("qwen2", {}),
}


NEW_TOKENS = 8


def make_prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 2, 7, 33, 64, 129)]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """name -> (model directory, HF model, HF greedy continuations of make_prompts()), built once."""
    from transformers import AutoModelForCausalLM

    built = {}

    def get(name: str):
        if name not in built:
            arch, overrides = TINY_MODELS[name]
            path = str(make_tiny_model(tmp_path_factory.mktemp(name), arch, **overrides))
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            built[name] = path, hf, [hf_greedy(hf, p, NEW_TOKENS) for p in make_prompts()]
        return built[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY_MODELS))
@pytest.mark.parametrize("settings", [dict(token_budget=5, kv_block_size=4), dict(kv_block_size=16)],
                         ids=["budget5-block4", "default-budget"])
def test_greedy_matches_hf(native, tiny_models, name, settings):
    """Prompts of 1-129 tokens in one batch: with a budget of 5 they are split over dozens of steps
    and share them with decodes."""
    path, hf, expected = tiny_models(name)
    prompts = make_prompts()
    pipe = splitfuse.pipeline(path, backend="cpu-native", **settings)
    try:
        assert isinstance(pipe.engine.backend, CpuNativeBackend)
        responses = pipe(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
        assert pipe.engine.blocks.num_free == pipe.engine.blocks.num_blocks
    finally:
        pipe.close()
    problems = [mismatch(hf, p, r.token_ids, ref) for p, r, ref in zip(prompts, responses, expected)]
    assert [p for p in problems if p] == []
    assert all(len(r.token_ids) == NEW_TOKENS for r in responses)
