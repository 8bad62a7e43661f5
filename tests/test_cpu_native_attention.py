"""The cpu backend's compiled kernels (splitfuse.native._cpu_attention) against the plain-torch
reference ops, and the fallback to those ops when the kernels are not there."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from splitfuse import native
from splitfuse.backends import Backend
from splitfuse.backends.cpu import CpuBackend, native_ops
from splitfuse.backends.torch_ops import build_cos_sin_cache
from splitfuse.testing.conformance.tolerances import assert_close
from splitfuse.testing.ragged import filled_cache, ragged_step

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

# decodes at block edges and mid-block, a first chunk, a later chunk, a long prompt over several
# key chunks of the kernel, a sequence of one token
MIXED = [(1, 1), (33, 1), (21, 9), (9, 9), (70, 70), (16, 1)]


@pytest.fixture(scope="module")
def cpu():
    if native_ops.load() is None:  # built at install time: a missing build is a failure, not a skip
        pytest.fail(f"the native kernels are not there: {native_ops.unavailable_reason()}")
    return CpuBackend()


@pytest.fixture(scope="module")
def reference():
    return Backend()


@pytest.fixture
def threads():
    """Runs a function with n OpenMP threads, then restores torch's setting."""
    before = torch.get_num_threads()

    def run(n, fn):
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    yield run
    torch.set_num_threads(before)


def attention_case(dtype, specs=MIXED, block_size=4, H=6, Hkv=2, D=32, seed=0):
    step = ragged_step(specs, block_size, seed=seed)
    kv, _, _ = filled_cache(step, Hkv, D, dtype, seed=seed)
    q = torch.randn(step.meta.num_tokens, H, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return q, kv, step.meta


def with_holes(meta):
    """The same step with a block-table column past every sequence's last block that holds no real
    block: a kernel must never read (or check) table entries past a sequence's context."""
    tables = meta.block_tables
    meta.block_tables = torch.cat([tables, torch.full((tables.shape[0], 1), 10**6, dtype=torch.int32)], dim=1)
    return meta


# ---- paged attention ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 32), (6, 2, 32), (4, 1, 40)], ids=["mha", "gqa", "mqa-d40"])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 15.0), (7, 10.0)],
                         ids=["causal", "window", "softcap", "window-softcap"])
def test_paged_attention_matches_the_reference(cpu, reference, dtype, H, Hkv, D, window, softcap):
    q, kv, meta = attention_case(dtype, H=H, Hkv=Hkv, D=D)
    got = cpu.paged_attention(q, kv, meta, D ** -0.5, window, softcap)
    expected = reference.paged_attention(q, kv, meta, D ** -0.5, window, softcap)
    assert got.dtype == dtype
    assert_close(got, expected, dtype, "paged_attention")


def test_paged_attention_reads_only_each_sequences_blocks(cpu, reference):
    # unused slots hold NaN (filled_cache) and the tables end in a column of no real block
    q, kv, meta = attention_case(torch.float32, specs=[(13, 1), (8, 8), (5, 2)], block_size=4)
    meta = with_holes(meta)
    got = cpu.paged_attention(q, kv, meta, 0.2)
    assert not got.isnan().any()
    assert_close(got, reference.paged_attention(q, kv, meta, 0.2), torch.float32, "paged_attention")


def test_paged_attention_in_float16(cpu, reference):
    q, kv, meta = attention_case(torch.float16, H=4, Hkv=2, D=40)
    assert_close(cpu.paged_attention(q, kv, meta, 0.2, 6, 12.0), reference.paged_attention(q, kv, meta, 0.2, 6, 12.0),
                 torch.float16, "paged_attention")


def test_paged_attention_of_a_decode_only_step_with_one_block_per_sequence(cpu, reference):
    q, kv, meta = attention_case(torch.bfloat16, specs=[(3, 1), (16, 1), (1, 1)], block_size=16)
    assert_close(cpu.paged_attention(q, kv, meta, 0.3), reference.paged_attention(q, kv, meta, 0.3),
                 torch.bfloat16, "paged_attention")


def test_a_block_table_entry_outside_the_cache_is_refused_by_name(cpu):
    q, kv, meta = attention_case(torch.float32, specs=[(6, 2)], block_size=4)
    meta.block_tables = meta.block_tables.clone()
    meta.block_tables[0, 1] = kv.shape[1]
    with pytest.raises(ValueError, match=r"block_tables\[0, 1\] = \d+ is not a block of the cache"):
        cpu.paged_attention(q, kv, meta, 0.2)


def test_a_cache_of_another_dtype_runs_the_reference(cpu, reference):
    q, kv, meta = attention_case(torch.float32)
    kv = kv.to(torch.bfloat16)
    assert torch.equal(cpu.paged_attention(q, kv, meta, 0.2), reference.paged_attention(q, kv, meta, 0.2))


# ---- prompt chunks: units of many rows run the register-tile kernel -----------------------------
# long prompts over many blocks and key chunks, a chunk continuing a cached prefix, and decodes
PROMPT_CHUNKS = [(150, 150), (230, 90), (40, 1), (97, 1)]
SHAPES = [(8, 4, 32), (14, 2, 64), (14, 2, 128), (4, 1, 18)]
SHAPE_IDS = ["group2-d32", "group7-d64", "group7-d128", "group4-d18"]


@pytest.mark.parametrize("H,Hkv,D", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("window,softcap", [(None, None), (50, None), (None, 30.0)],
                         ids=["causal", "window", "softcap"])
def test_prompt_chunks_match_the_reference(cpu, reference, H, Hkv, D, window, softcap):
    q, kv, meta = attention_case(torch.float32, specs=PROMPT_CHUNKS, block_size=16, H=H, Hkv=Hkv, D=D)
    assert_close(cpu.paged_attention(q, kv, meta, D ** -0.5, window, softcap),
                 reference.paged_attention(q, kv, meta, D ** -0.5, window, softcap), torch.float32, "paged_attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prompt_chunks_in_half_precision_match_the_reference(cpu, reference, dtype):
    q, kv, meta = attention_case(dtype, specs=PROMPT_CHUNKS, block_size=16, H=14, Hkv=2, D=64)
    assert_close(cpu.paged_attention(q, kv, meta, 0.125, 70, 30.0),
                 reference.paged_attention(q, kv, meta, 0.125, 70, 30.0), dtype, "paged_attention")


@pytest.mark.parametrize("path", ["rows", "tiles", "decode"])
@pytest.mark.parametrize("H,Hkv,D", SHAPES[:2], ids=SHAPE_IDS[:2])
def test_either_kernel_runs_every_kind_of_unit(cpu, reference, path, H, Hkv, D):
    # the row-by-row kernel on prompt chunks, the tiles on decodes of a small group (padding lanes)
    q, kv, meta = attention_case(torch.float32, specs=PROMPT_CHUNKS + [(5, 3)], block_size=8, H=H, Hkv=Hkv, D=D)
    got = native_ops.load().paged_attention(q, kv, meta, 0.2, 33, 25.0, path=path)
    assert_close(got, reference.paged_attention(q, kv, meta, 0.2, 33, 25.0), torch.float32, "paged_attention")


def test_an_unknown_kernel_path_is_refused_by_name(cpu):
    q, kv, meta = attention_case(torch.float32)
    with pytest.raises(ValueError, match=r"path 'fast': expected one of \['auto', 'decode', 'rows', 'tiles'\]"):
        native_ops.load().paged_attention(q, kv, meta, 0.2, None, None, path="fast")


# ---- decodes: units of every kv head, long contexts of few decodes split into merged key ranges ----
# one decode of a long context (split), decodes of short ones, next to a prompt chunk
DECODES = [(700, 1)]
DECODE_BATCH = [(300, 1), (65, 1), (1, 1), (129, 1), (40, 8)]


@pytest.mark.parametrize("specs", [DECODES, DECODE_BATCH], ids=["one-long", "batch"])
@pytest.mark.parametrize("H,Hkv,D", SHAPES[:2] + [(4, 1, 18), (3, 1, 40)],
                         ids=SHAPE_IDS[:2] + ["group4-d18", "group3-d40"])
@pytest.mark.parametrize("window,softcap", [(None, None), (90, None), (None, 30.0)],
                         ids=["causal", "window", "softcap"])
def test_decode_units_match_the_reference(cpu, reference, specs, H, Hkv, D, window, softcap):
    q, kv, meta = attention_case(torch.float32, specs=specs, block_size=16, H=H, Hkv=Hkv, D=D)
    got = native_ops.load().paged_attention(q, kv, meta, D ** -0.5, window, softcap, path="decode")
    assert_close(got, reference.paged_attention(q, kv, meta, D ** -0.5, window, softcap), torch.float32,
                 "paged_attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_units_in_half_precision_match_the_reference(cpu, reference, dtype):
    q, kv, meta = attention_case(dtype, specs=DECODES + DECODE_BATCH, block_size=16, H=14, Hkv=2, D=64)
    assert_close(cpu.paged_attention(q, kv, meta, 0.125, 200, 30.0),
                 reference.paged_attention(q, kv, meta, 0.125, 200, 30.0), dtype, "paged_attention")


@pytest.mark.parametrize("specs", [DECODES, DECODE_BATCH], ids=["one-long", "batch"])
def test_decode_units_are_identical_with_one_and_two_threads(cpu, threads, specs):
    q, kv, meta = attention_case(torch.float32, specs=specs, block_size=16, H=8, Hkv=4, D=32)

    def run():
        return native_ops.load().paged_attention(q, kv, meta, 0.2, 250, 20.0, path="decode")

    assert torch.equal(threads(1, run), threads(2, run))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prompt_chunks_are_identical_with_one_and_two_threads(cpu, threads, dtype):
    q, kv, meta = attention_case(dtype, specs=PROMPT_CHUNKS, block_size=16, H=14, Hkv=2, D=64)
    one, two = (threads(n, lambda: cpu.paged_attention(q, kv, meta, 0.125, 70, None)) for n in (1, 2))
    assert torch.equal(one, two)


# ---- rotary ------------------------------------------------------------------------------------
def rotary_case(dtype, D=32, rotary_dim=None, T=7, H=4, Hkv=2, seed=0):
    """q, k, v as views of one fused qkv projection (the models' layout), positions, cos/sin table."""
    gen = torch.Generator().manual_seed(seed)
    rd = rotary_dim or D
    cos_sin = build_cos_sin_cache(1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd)), 64).to(dtype)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen).to(dtype)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    positions = torch.randint(0, 64, (T,), generator=gen)
    return q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D), positions, cos_sin


ROTARY_LAYOUTS = [(None, False), (None, True), (16, False)]  # neox, GPT-J pairs, partial rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rotary_dim,interleaved", ROTARY_LAYOUTS, ids=["neox", "gptj", "partial"])
@pytest.mark.parametrize("D", [32, 40], ids=["d32", "d40"])  # 40: vectors of 8 pairs and a scalar tail
def test_rotary_equals_the_reference_bit_for_bit(cpu, reference, dtype, rotary_dim, interleaved, D):
    # the same products and roundings as the reference (and HF): identical, not merely close
    q, k, _, positions, cos_sin = rotary_case(dtype, D=D, rotary_dim=rotary_dim)
    got = cpu.rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
    expected = reference.rotary(q, k, positions, cos_sin, rotary_dim, interleaved)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rotary_dim,interleaved", ROTARY_LAYOUTS, ids=["neox", "gptj", "partial"])
def test_rotary_write_kv_stores_what_the_reference_stores(cpu, reference, dtype, rotary_dim, interleaved):
    q, k, v, positions, cos_sin = rotary_case(dtype, rotary_dim=rotary_dim)
    step = ragged_step([(5, 3), (9, 4)], block_size=4)
    kv, _, _ = filled_cache(step, 2, 32, dtype)
    expected_kv = kv.clone()
    slots = step.meta.slot_mapping
    got = cpu.rotary_write_kv(q, k, v, positions, cos_sin, kv, slots, rotary_dim, interleaved)
    expected = reference.rotary_write_kv(q, k, v, positions, cos_sin, expected_kv, slots, rotary_dim, interleaved)
    assert torch.equal(got, expected)
    assert torch.equal(kv.nan_to_num(), expected_kv.nan_to_num())  # untouched slots stay NaN on both


def test_a_subclass_that_replaces_write_kv_keeps_it_in_rotary_write_kv(cpu):
    written = []

    class Counting(CpuBackend):
        def write_kv(self, kv_layer, k, v, slot_mapping):
            written.append(slot_mapping.numel())
            super().write_kv(kv_layer, k, v, slot_mapping)

    q, k, v, positions, cos_sin = rotary_case(torch.float32)
    step = ragged_step([(5, 3), (9, 4)], block_size=4)
    kv, _, _ = filled_cache(step, 2, 32)
    Counting().rotary_write_kv(q, k, v, positions, cos_sin, kv, step.meta.slot_mapping)
    assert written == [7]


def test_a_position_outside_the_table_is_refused_by_name(cpu):
    q, k, _, positions, cos_sin = rotary_case(torch.float32)
    positions[3] = cos_sin.shape[0]
    with pytest.raises(ValueError, match=r"positions\[3\] = 64 is outside the cos/sin table of 64 positions"):
        cpu.rotary(q, k, positions, cos_sin)


# ---- RMSNorm -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["alone", "residual"])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_matches_the_reference(cpu, reference, dtype, with_residual, weight_offset):
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(5, 41, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(41, generator=gen).to(dtype)
    residual = residual if with_residual else None
    got = cpu.rms_norm(x, weight, 1e-6, residual, weight_offset)
    expected = reference.rms_norm(x, weight, 1e-6, residual, weight_offset)
    if with_residual:
        assert torch.equal(got[1], expected[1])  # the sum is one rounding of x + residual on both sides
        got, expected = got[0], expected[0]
    assert_close(got, expected, dtype, "rms_norm")


# ---- threads -----------------------------------------------------------------------------------
def test_results_are_identical_with_one_and_two_threads(cpu, threads):
    q, kv, meta = attention_case(torch.float32, specs=MIXED * 2, H=4, Hkv=2)
    x = torch.randn(2100, 128)  # above 2**18 elements, so the norm runs in parallel
    rq, rk, rv, positions, cos_sin = rotary_case(torch.float32, T=300)

    def run():
        cache = kv.clone()
        return (cpu.paged_attention(q, kv, meta, 0.2, 9, 20.0), *cpu.rms_norm(x, x[0].clone(), 1e-6, x),
                cpu.rotary_write_kv(rq, rk, rv, positions, cos_sin, cache, torch.arange(300), None, False),
                cache.nan_to_num())

    one, two = threads(1, run), threads(2, run)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


# ---- the fallback ------------------------------------------------------------------------------
def test_without_the_module_the_backend_runs_the_reference_and_says_why(monkeypatch, reference):
    monkeypatch.setattr(native, "load", lambda name: None)
    monkeypatch.setattr(native, "unavailable_reason", lambda name: f"splitfuse.native._{name} is not built")
    backend = CpuBackend()
    assert backend.describe() == (f"cpu ({torch.get_num_threads()} threads, plain torch: "
                                  "splitfuse.native._cpu_attention is not built)")
    q, kv, meta = attention_case(torch.float32)
    assert torch.equal(backend.paged_attention(q, kv, meta, 0.2, 5, 10.0),
                       reference.paged_attention(q, kv, meta, 0.2, 5, 10.0))
    x = torch.randn(3, 16)
    assert torch.equal(backend.rms_norm(x, x[0], 1e-6), reference.rms_norm(x, x[0], 1e-6))


def test_turning_native_kernels_off_is_named_in_describe_for_the_backends_lifetime(cpu, monkeypatch):
    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")
    plain = CpuBackend()
    monkeypatch.delenv("SPLITFUSE_NATIVE")
    assert plain.describe().endswith("threads, plain torch: turned off (SPLITFUSE_NATIVE=0))")


def test_splitfuse_backends_shows_which_ops_the_cpu_backend_runs(monkeypatch, capsys):
    from splitfuse.cli import main

    assert main(["backends"]) == 0
    cpu_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu "))
    assert cpu_line.endswith("available (native kernels)")
    monkeypatch.setenv("SPLITFUSE_NATIVE", "0")
    assert main(["backends"]) == 0
    cpu_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu "))
    assert cpu_line.endswith("available (plain torch: turned off (SPLITFUSE_NATIVE=0))")


# ---- the side-by-side benchmark ------------------------------------------------------------------
def test_the_attention_benchmark_prints_every_case_with_its_ratio(cpu, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_cpu_attention")
    assert bench.causal_flops([(3, 2)], num_heads=2, head_dim=4) == 4 * (2 + 3) * 2 * 4  # keys 2 and 3
    monkeypatch.setattr(bench, "SHAPES", {"tiny": (4, 2, 8)})
    monkeypatch.setattr(bench, "CASES", {"chunk": [(20, 12)], "decode": [(9, 1)] * 3})
    monkeypatch.setattr(sys, "argv", ["bench_cpu_attention.py", "--threads", "1", "--repeats", "1"])
    bench.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("tiny")]
    assert [row[1] for row in rows] == ["chunk", "decode"]
    assert all(float(row[-2]) > 0 and float(row[-1]) < 1e-5 for row in rows)  # rows / auto, max difference
    assert all(float(row[-3]) > 0 for row in rows)  # rows / decode


def test_the_attention_benchmark_can_evict_the_caches_before_every_run(cpu, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_cpu_attention")
    monkeypatch.setattr(bench, "SHAPES", {"tiny": (4, 2, 8)})
    monkeypatch.setattr(bench, "CASES", {"decode": [(9, 1)] * 2})
    monkeypatch.setattr(bench, "EVICT_BYTES", 1 << 16)
    monkeypatch.setattr(sys, "argv", ["bench_cpu_attention.py", "--threads", "1", "--repeats", "1", "--cold"])
    bench.main()
    out = capsys.readouterr().out
    assert "cold caches" in out.splitlines()[0]
    assert [line.split()[1] for line in out.splitlines() if line.startswith("tiny")] == ["decode"]
