"""XpuBackend: availability reasons and memory sizing with torch.xpu faked, kernel selection, and
its ops and a whole pipeline in the CPU test mode (SPLITFUSE_XPU_ON_CPU=1) against the cpu
reference ops and Hugging Face transformers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import types

import pytest
import torch

import splitfuse
from splitfuse.backends import Backend, BackendError, create_backend, list_backends, torch_ops
from splitfuse.backends.cpu import CpuBackend
from splitfuse.backends.xpu import XpuBackend, ipex_attention, kernels
from splitfuse.backends.xpu import device as xpu_device
from splitfuse.config import EngineConfig
from splitfuse.plugins import reset_plugin_manager
from splitfuse.testing.parity import hf_greedy, mismatch
from splitfuse.testing.ragged import filled_cache, ragged_step

GIB = 1 << 30
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# the Triton interpreter turns runtime loop bounds into ints through a numpy conversion it deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.delenv("SPLITFUSE_BACKEND", raising=False)
    monkeypatch.delenv("SPLITFUSE_XPU_ON_CPU", raising=False)
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setenv("SPLITFUSE_XPU_ON_CPU", "1")


# ---- availability -------------------------------------------------------------------------------
def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: False)
    assert "was built without XPU support" in XpuBackend.unavailable_reason()
    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert XpuBackend.unavailable_reason().startswith("no XPU device found (torch.xpu.is_available() is False)")
    assert XpuBackend.device_count() == 0

    def broken():
        raise RuntimeError("level_zero: ZE_RESULT_ERROR_UNINITIALIZED")
    monkeypatch.setattr(torch.xpu, "is_available", broken)
    assert XpuBackend.unavailable_reason() == (
        "the XPU driver failed: RuntimeError: level_zero: ZE_RESULT_ERROR_UNINITIALIZED")
    infos = {i.name: i for i in list_backends()}
    assert not infos["xpu"].available and "ZE_RESULT_ERROR_UNINITIALIZED" in infos["xpu"].reason
    with pytest.raises(BackendError, match="backend 'xpu' is unavailable: the XPU driver failed"):
        create_backend("xpu")

    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    assert XpuBackend.is_available() and XpuBackend.device_count() == 2 and XpuBackend.auto_selectable()

    monkeypatch.delattr(torch, "xpu")
    assert "has no torch.xpu module" in XpuBackend.unavailable_reason()


def test_priority_between_cuda_and_cpu():
    priorities = {i.name: i.priority for i in list_backends()}
    assert priorities["cuda"] > priorities["xpu"] == XpuBackend.priority > priorities["cpu"]


def test_test_mode_is_named_only(on_cpu):
    info = next(i for i in list_backends() if i.name == "xpu")
    assert info.available and not info.auto_selectable
    assert create_backend("auto").name != "xpu"
    backend = create_backend("xpu")
    assert isinstance(backend, XpuBackend) and backend.device == torch.device("cpu")
    assert backend.default_dtype() == torch.float32 and XpuBackend.device_count() == 1
    assert backend.describe().startswith("xpu (test mode on cpu; kernels: ")
    config = EngineConfig(kv_cache_gib=0.5)
    assert backend.num_kv_blocks(config, 1 << 20, 64) == 512  # kv_cache_gib, as the cpu backend
    backend.synchronize()


def test_importing_the_backend_imports_no_triton_and_no_ipex():
    code = ("import sys, splitfuse.backends.builtin; from splitfuse.backends.xpu import XpuBackend; "
            "XpuBackend.unavailable_reason(); XpuBackend.device_count(); "
            "bad = [m for m in ('triton', 'intel_extension_for_pytorch') if m in sys.modules]; "
            "assert not bad, bad")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


# ---- memory -------------------------------------------------------------------------------------
@pytest.fixture
def xpu_backend_on_fake_device(monkeypatch):
    """An XpuBackend whose device is xpu:0 with torch.xpu's memory functions faked."""
    monkeypatch.setattr(torch.xpu, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.xpu, "empty_cache", lambda: None)
    backend = XpuBackend.__new__(XpuBackend)
    backend.device, backend.device_module = torch.device("xpu", 0), torch.xpu
    return backend


def test_num_kv_blocks_from_mem_get_info(monkeypatch, xpu_backend_on_fake_device):
    total, free = 64 * GIB, 40 * GIB
    monkeypatch.setattr(torch.xpu, "mem_get_info", lambda device=None: (free, total))
    config = EngineConfig(gpu_memory_utilization=0.9, token_budget=768)
    per_block = 2 * 32 * 16 * 8 * 128 * 2
    reserve = GIB + 768 * 4096 * 32
    blocks = xpu_backend_on_fake_device.num_kv_blocks(config, per_block, 4096)
    assert blocks == (int(0.9 * total) - (total - free) - reserve) // per_block


def test_num_kv_blocks_falls_back_where_mem_get_info_is_unsupported(monkeypatch, xpu_backend_on_fake_device, caplog):
    def unsupported(device=None):
        raise RuntimeError("The device (Intel(R) Arc(TM) A770) doesn't support querying the available free memory")
    monkeypatch.setattr(torch.xpu, "mem_get_info", unsupported)
    monkeypatch.setattr(torch.xpu, "get_device_properties", lambda device=None: types.SimpleNamespace(
        name="Intel(R) Arc(TM) A770", total_memory=16 * GIB))
    monkeypatch.setattr(torch.xpu, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.xpu, "memory_allocated", lambda device=None: 2 * GIB)
    assert xpu_device.memory_in_use(torch.device("xpu", 0)) == (
        16 * GIB, 3 * GIB, "total_memory - memory_reserved (this process only)")
    config = EngineConfig(gpu_memory_utilization=0.8, token_budget=256)
    with caplog.at_level("INFO", logger="splitfuse"):
        blocks = xpu_backend_on_fake_device.num_kv_blocks(config, 1 << 20, 2048)
    assert blocks == (int(0.8 * 16 * GIB) - 3 * GIB - GIB - 256 * 2048 * 32) // (1 << 20)
    assert "doesn't support querying" in caplog.text and "this process only" in caplog.text
    with pytest.raises(RuntimeError, match="no XPU memory left for the KV cache: 25% of 16.0 GiB"):
        xpu_backend_on_fake_device.num_kv_blocks(EngineConfig(gpu_memory_utilization=0.25), 1 << 20, 2048)


# ---- kernel selection ---------------------------------------------------------------------------
def test_triton_xpu_backend_detection(monkeypatch, tmp_path):
    fake_triton = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: fake_triton if name == "triton" else None)
    monkeypatch.setattr(kernels.importlib.metadata, "entry_points", lambda group: [])
    assert not kernels.triton_has_xpu_backend()
    assert "no Intel XPU backend" in kernels.triton_unusable_reason("xpu")
    assert kernels.choose("xpu") == "torch"
    (tmp_path / "backends" / "intel").mkdir(parents=True)
    (tmp_path / "backends" / "intel" / "compiler.py").write_text("")
    assert kernels.triton_has_xpu_backend()
    monkeypatch.setattr(kernels.importlib.metadata, "entry_points",
                        lambda group: [types.SimpleNamespace(name="intel")] if group == "triton.backends" else [])
    (tmp_path / "backends" / "intel" / "compiler.py").unlink()
    assert kernels.triton_has_xpu_backend()  # registered as an entry point only
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    assert not kernels.triton_has_xpu_backend()


def test_kernel_choice_override(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert kernels.choose("cpu") == kernels.choose("xpu") == "torch"
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="SPLITFUSE_XPU_KERNELS='cuda': expected one of auto, triton, torch"):
        kernels.choose("xpu")
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    monkeypatch.setattr(kernels, "triton_has_xpu_backend", lambda: False)
    with pytest.raises(RuntimeError, match="SPLITFUSE_XPU_KERNELS=triton, but triton has no Intel XPU backend"):
        kernels.choose("xpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="only under TRITON_INTERPRET=1"):
        kernels.choose("cpu")


# ---- ops in the CPU test mode, against the cpu reference ----------------------------------------
@pytest.fixture(params=["triton", "torch"])
def xpu_ops(request, monkeypatch, on_cpu):
    """The backend in test mode with each kernel choice."""
    if request.param == "triton" and not INTERPRETER:
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv(kernels.KERNELS_ENV, request.param)
    backend = create_backend("xpu")
    assert backend.kernels == request.param and backend.attention_impl(torch.float32) == request.param
    return backend


def test_norm_and_activation_ops(xpu_ops):
    ref = CpuBackend()
    x, r, w = (torch.randn(5, 41) for _ in range(3))
    torch.testing.assert_close(xpu_ops.rms_norm(x, w[0], 1e-6), ref.rms_norm(x, w[0], 1e-6), rtol=1e-6, atol=1e-6)
    for got, want in zip(xpu_ops.rms_norm(x, w[0], 1e-6, r, 1.0), ref.rms_norm(x, w[0], 1e-6, r, 1.0)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g = torch.randn(3, 2 * 9)
    torch.testing.assert_close(xpu_ops.silu_and_mul(g), ref.silu_and_mul(g), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xpu_ops.gelu_and_mul(g, "tanh"), ref.gelu_and_mul(g, "tanh"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, softcap", [(None, None), (6, None), (None, 5.0)])
@pytest.mark.parametrize("fused", [True, False], ids=["rotary_attention", "rotary+attention"])
def test_attention_ops(xpu_ops, window, softcap, fused):
    """A mixed step (decode, prompt chunk over cached context, fresh prompt), GQA, partial rotary,
    shuffled 4-token blocks: output and every written cache slot equal the reference's."""
    specs = [(9, 1), (13, 5), (3, 3)]
    H, Hkv, D, R = 4, 2, 12, 8
    step = ragged_step(specs, 4, seed=3, spare_blocks=2)
    meta = step.meta
    gen = torch.Generator().manual_seed(7)
    cache = torch.full((2, step.num_blocks, 4, Hkv, D), float("nan"))
    for (ctx, new), seq_slots in zip(specs, step.slots):  # earlier steps' keys
        old = torch.tensor(seq_slots[: ctx - new], dtype=torch.long)
        torch_ops.write_kv(cache, torch.randn(len(old), Hkv, D, generator=gen),
                           torch.randn(len(old), Hkv, D, generator=gen), old)
    ref_cache = cache.clone()
    q, k, v = (torch.randn(meta.num_tokens, n, D, generator=gen) for n in (H, Hkv, Hkv))
    cos_sin = torch_ops.build_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, R, 2) / R), 32)
    scale = D ** -0.5
    ref = Backend.rotary_attention(CpuBackend(), q, k, v, meta.positions, cos_sin, ref_cache, meta, scale,
                                   window, softcap, rotary_dim=R)
    if fused:
        out = xpu_ops.rotary_attention(q, k, v, meta.positions, cos_sin, cache, meta, scale, window, softcap,
                                       rotary_dim=R)
    else:
        q_rot, k_rot = xpu_ops.rotary(q, k, meta.positions, cos_sin, R)
        out = xpu_ops.attention(q_rot, k_rot, v, cache, meta, scale, window, softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.isnan(), ref_cache.isnan())
    torch.testing.assert_close(cache[~cache.isnan()], ref_cache[~ref_cache.isnan()], rtol=1e-6, atol=1e-6)


# ---- intel-extension-for-pytorch, optional --------------------------------------------------------
class _FakeIpexPagedAttention:
    """flash_attn_varlen_func with IPEX's argument conventions, computed densely per sequence."""

    calls: list[dict] = []

    @classmethod
    def flash_attn_varlen_func(cls, out, q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, scale, is_causal,
                               block_table, alibi, window_size_left=-1, window_size_right=-1, softcap=0.0):
        cls.calls.append(dict(max_q=max_q, max_k=max_k, left=window_size_left, softcap=softcap, causal=is_causal))
        block_size = k_cache.shape[1]
        for s in range(len(cu_q) - 1):
            q0, q1, n_k = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s + 1] - cu_k[s])
            pos = torch.arange(n_k)
            slots = block_table[s].long()[pos // block_size] * block_size + pos % block_size
            k = k_cache.reshape(-1, *k_cache.shape[2:])[slots].float()  # [n_k, Hkv, D]
            v = v_cache.reshape(-1, *v_cache.shape[2:])[slots].float()
            G = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            scores = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            qpos = torch.arange(n_k - (q1 - q0), n_k)[:, None]  # causal, aligned to the end
            hidden = pos[None, :] > qpos
            if window_size_left >= 0:
                hidden |= qpos - pos[None, :] > window_size_left
            scores = scores.masked_fill(hidden, float("-inf"))
            out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)


@pytest.fixture
def fake_ipex(monkeypatch):
    module = types.ModuleType(ipex_attention.MODULE)
    module.llm = types.SimpleNamespace(modules=types.SimpleNamespace(PagedAttention=_FakeIpexPagedAttention))
    monkeypatch.setitem(sys.modules, ipex_attention.MODULE, module)
    monkeypatch.setattr(ipex_attention.importlib.util, "find_spec", lambda name: object())
    _FakeIpexPagedAttention.calls = []
    return _FakeIpexPagedAttention


def test_ipex_is_optional(monkeypatch):
    monkeypatch.setattr(ipex_attention.importlib.util, "find_spec", lambda name: None)
    assert ipex_attention.load() is None
    monkeypatch.setattr(ipex_attention.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, ipex_attention.MODULE, None)  # installed but fails to import
    assert ipex_attention.load() is None


@pytest.mark.parametrize("window, softcap", [(None, None), (6, 5.0)])
def test_ipex_attention_in_bf16_only(monkeypatch, on_cpu, fake_ipex, window, softcap):
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    backend = create_backend("xpu")
    assert backend.attention_impl(torch.bfloat16) == "ipex" and backend.attention_impl(torch.float32) == "torch"
    assert "attention: ipex" in backend.describe()
    step = ragged_step([(9, 1), (13, 5), (3, 3)], 4, seed=5)
    cache, _, _ = filled_cache(step, 2, 16, torch.bfloat16)
    q = torch.randn(step.meta.num_tokens, 4, 16).to(torch.bfloat16)
    out = backend.paged_attention(q, cache, step.meta, 0.25, window, softcap)
    ref = torch_ops.paged_attention(q, cache, step.meta, 0.25, window, softcap)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)  # bf16 outputs
    assert fake_ipex.calls == [dict(max_q=5, max_k=13, left=-1 if window is None else window - 1,
                                    softcap=0.0 if softcap is None else softcap, causal=True)]
    backend.paged_attention(q.float(), cache.float(), step.meta, 0.25)
    assert len(fake_ipex.calls) == 1  # fp32 never goes to IPEX


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kernel_choice, model, lengths, new", [
    pytest.param("triton", "llama", (1, 5, 11), 4, marks=needs_interpreter),
    ("torch", "mistral", (3, 30, 47), 8),
])
def test_pipeline_matches_hf(monkeypatch, on_cpu, tiny_model_dir, hf_model, kernel_choice, model, lengths, new):
    """Greedy output equals HF token for token with prompts chunked over a tiny token budget."""
    monkeypatch.setenv(kernels.KERNELS_ENV, kernel_choice)
    path = tiny_model_dir(model)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]
    pipe = splitfuse.pipeline(path, backend="xpu", kv_block_size=4, token_budget=8)
    try:
        assert pipe.engine.backend.name == "xpu" and pipe.engine.backend.kernels == kernel_choice
        responses = pipe(prompts, max_new_tokens=new, temperature=0.0)
    finally:
        pipe.close()
    reference = hf_model(path)
    problems = [mismatch(reference, p, r.token_ids, hf_greedy(reference, p, new)) for p, r in zip(prompts, responses)]
    assert [p for p in problems if p] == []
    assert all(len(r.token_ids) == new for r in responses)
