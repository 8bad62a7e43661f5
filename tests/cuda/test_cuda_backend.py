"""CudaBackend: discovery (GPU, interpreter mode, unavailable), selection, memory sizing, and its
ops against the cpu backend's reference ops."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from splitfuse.backends import Backend, BackendError, create_backend, list_backends, torch_ops
from splitfuse.backends.cpu import CpuBackend
from splitfuse.backends.cuda import CudaBackend
from splitfuse.backends import device_backend
from splitfuse.cli import main
from splitfuse.config import EngineConfig
from splitfuse.testing.ragged import ragged_step  # noqa: E402
from splitfuse.plugins import reset_plugin_manager


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.delenv("SPLITFUSE_BACKEND", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def interpreter_only(device):
    if device.type != "cpu":
        pytest.skip("checks interpreter mode (this machine has a GPU)")


# ---- discovery and selection --------------------------------------------------------------------
def test_listed_available_in_interpreter_mode(interpreter_only, capsys):
    infos = {i.name: i for i in list_backends()}
    assert infos["cuda"].available and infos["cuda"].priority == 100
    assert main(["backends"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cuda"))
    assert "available" in line and "unavailable" not in line
    assert "only when named" in line  # the listing says why `auto` still picks cpu


def test_auto_keeps_cpu_in_interpreter_mode_and_cuda_works_by_name(interpreter_only):
    assert not CudaBackend.auto_selectable()
    assert CudaBackend.device_count() == 1  # the interpreter is one device: the cpu
    assert isinstance(create_backend("auto"), CpuBackend)
    backend = create_backend("cuda")
    assert isinstance(backend, CudaBackend)
    assert backend.device == torch.device("cpu")
    assert backend.default_dtype() == torch.float32
    assert set(backend.dtypes) == {torch.float16, torch.bfloat16, torch.float32}
    assert backend.describe() == "cuda (Triton interpreter on cpu)"
    # interpreter mode sizes the cache like the cpu backend (there is no device memory to query)
    config = EngineConfig(kv_cache_gib=0.5)
    assert backend.num_kv_blocks(config, 1 << 20, 64) == CpuBackend().num_kv_blocks(config, 1 << 20, 64) == 512
    backend.synchronize()


def test_unavailable_without_gpu_or_interpreter(monkeypatch):
    # read at call time: triton is already imported (in interpreter mode) by now
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not CudaBackend.is_available()
    assert "no CUDA device (torch.cuda.is_available() is False)" in CudaBackend.unavailable_reason()
    infos = {i.name: i for i in list_backends()}
    assert not infos["cuda"].available and "no CUDA device" in infos["cuda"].reason
    assert CudaBackend.auto_selectable()  # on a real GPU `auto` would take it
    assert isinstance(create_backend("auto"), CpuBackend)
    with pytest.raises(BackendError, match="backend 'cuda' is unavailable: no CUDA device"):
        create_backend("cuda")


def test_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert CudaBackend.unavailable_reason() == "triton is not installed (pip install triton)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert CudaBackend.unavailable_reason() == "triton is not installed (pip install triton)"


def test_importing_the_backend_imports_no_triton():
    code = ("import sys, splitfuse.backends.cuda, splitfuse.backends.builtin; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert splitfuse.backends.cuda.CudaBackend.name == 'cuda'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_kv_block_size_and_interface():
    assert issubclass(CudaBackend, Backend)
    assert CudaBackend.name == "cuda" and CudaBackend.priority == 100
    backend = CudaBackend.__new__(CudaBackend)  # no device needed for the block-size rule
    assert backend.kv_block_size(64) == 32 and backend.kv_block_size(128) == 16
    assert all(backend.kv_block_size(d) >= 16 for d in (8, 80, 96, 256))


def test_num_kv_blocks_from_gpu_memory(monkeypatch, caplog):
    """The GPU path's arithmetic, with the memory query faked."""
    gib = 1 << 30
    total, used = 80 * gib, 20 * gib
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - used, total))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    backend = CudaBackend.__new__(CudaBackend)
    backend.device, backend.device_module = torch.device("cuda", 0), torch.cuda
    config = EngineConfig(gpu_memory_utilization=0.9, token_budget=768)
    per_block = 2 * 32 * 16 * 8 * 128 * 2  # Llama-3-8B: 32 layers, 8 kv heads, D 128, bf16, 16 tokens
    reserve = device_backend.RESERVE_FIXED + 768 * 4096 * device_backend.RESERVE_BYTES_PER_HIDDEN
    with caplog.at_level("INFO", logger="splitfuse"):
        blocks = backend.num_kv_blocks(config, per_block, 4096)
    assert blocks == (int(0.9 * total) - used - reserve) // per_block
    assert "blocks" in caplog.text and "GiB" in caplog.text
    with pytest.raises(RuntimeError, match="no GPU memory left for the KV cache"):
        backend.num_kv_blocks(EngineConfig(gpu_memory_utilization=0.25), per_block, 4096)


# ---- ops ----------------------------------------------------------------------------------------
def make_meta(specs, block_size, device, seed=0):
    """A ragged step: specs are (context_len incl. new tokens, new tokens) per sequence; blocks
    shuffled. Returns (meta, num_blocks, slots of every context token per sequence)."""
    step = ragged_step(specs, block_size, seed, spare_blocks=2)
    return step.meta.to(device), step.num_blocks, step.slots


@pytest.fixture
def backend(device):
    return create_backend("cuda")


def test_norm_and_activation_ops_match_cpu_backend(backend, device):
    ref = CpuBackend()
    x, r, w = (torch.randn(5, 41).to(device) for _ in range(3))
    torch.testing.assert_close(backend.rms_norm(x, w[0], 1e-6), ref.rms_norm(x, w[0], 1e-6), rtol=1e-6, atol=1e-6)
    for got, want in zip(backend.rms_norm(x, w[0], 1e-6, r, 1.0), ref.rms_norm(x, w[0], 1e-6, r, 1.0)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g = torch.randn(3, 2 * 9).to(device)
    torch.testing.assert_close(backend.silu_and_mul(g), ref.silu_and_mul(g), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backend.gelu_and_mul(g, "tanh"), ref.gelu_and_mul(g, "tanh"), rtol=1e-5, atol=1e-5)
    q, k = torch.randn(4, 4, 12).to(device), torch.randn(4, 2, 12).to(device)
    pos = torch.tensor([0, 3, 7, 2], device=device)
    cos_sin = torch_ops.build_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, 8, 2) / 8), 16).to(device)
    for got, want in zip(backend.rotary(q, k, pos, cos_sin, 8, True), ref.rotary(q, k, pos, cos_sin, 8, True)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.fixture(params=["triton-attention", "reference-attention"])
def attention_impl(request, monkeypatch):
    """The backend's own attention kernel, and the torch reference in its place: the second
    isolates the fused rotary + KV-write path from the attention kernel."""
    if request.param == "reference-attention":
        monkeypatch.setattr(CudaBackend, "attention_impl", lambda self, dtype: "torch")
    return request.param


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("fused", [True, False], ids=["rotary_attention", "rotary+attention"])
def test_attention_ops_match_cpu_backend(backend, device, attention_impl, block_size, fused):
    """A mixed step (decode, prompt chunk over cached context, fresh prompt); GQA; partial rotary.
    Both the attention output and every cache slot must match the reference backend."""
    specs = [(9, 1), (13, 5), (3, 3)]
    H, Hkv, D, R = 4, 2, 12, 8
    meta, num_blocks, all_slots = make_meta(specs, block_size, device, seed=block_size)
    gen = torch.Generator().manual_seed(7)
    cache = torch.full((2, num_blocks, block_size, Hkv, D), float("nan"))
    for (ctx, new), seq_slots in zip(specs, all_slots):  # earlier steps' keys
        old = torch.tensor(seq_slots[: ctx - new], dtype=torch.long)
        torch_ops.write_kv(cache, torch.randn(len(old), Hkv, D, generator=gen),
                           torch.randn(len(old), Hkv, D, generator=gen), old)
    cache = cache.to(device)
    ref_cache = cache.clone()
    T = meta.num_tokens
    q, k, v = (torch.randn(T, n, D, generator=gen).to(device) for n in (H, Hkv, Hkv))
    cos_sin = torch_ops.build_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, R, 2) / R), 32).to(device)
    scale = D ** -0.5

    ref = Backend.rotary_attention(CpuBackend(), q, k, v, meta.positions, cos_sin, ref_cache, meta, scale,
                                   rotary_dim=R)
    if fused:
        out = backend.rotary_attention(q, k, v, meta.positions, cos_sin, cache, meta, scale, rotary_dim=R)
    else:
        q_rot, k_rot = backend.rotary(q, k, meta.positions, cos_sin, R)
        out = backend.attention(q_rot, k_rot, v, cache, meta, scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.isnan(), ref_cache.isnan())
    torch.testing.assert_close(cache[~cache.isnan()], ref_cache[~ref_cache.isnan()], rtol=1e-6, atol=1e-6)


def test_prepare_batch(backend, device):
    meta, _, _ = make_meta([(5, 2), (3, 3)], 4, torch.device("cpu"))
    moved = backend.prepare_batch(meta)
    if device.type == "cpu":
        assert moved is meta
        return
    backend.synchronize()
    assert moved.step_cache == {} and moved.step_cache is not meta.step_cache
    for name in ("input_ids", "positions", "query_start", "context_lens", "block_tables", "slot_mapping",
                 "token_seq", "sample_index"):
        got, want = getattr(moved, name), getattr(meta, name)
        assert got.device == device and got.dtype == want.dtype and torch.equal(got.cpu(), want)
    assert moved.query_start_host == meta.query_start_host and moved.num_tokens == meta.num_tokens
