"""The quantized-decode benchmarks run end to end on a tiny model: scripts/bench_quantized_decode.py
(cpu, ratios to bfloat16 side by side) and the quantized section of scripts/gpu_bench.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))


def test_cpu_bench_prints_each_row_with_its_ratio_to_bfloat16(scripts, capsys):
    import bench_quantized_decode

    assert bench_quantized_decode.main(["--tiny", "--new-tokens", "2", "--variants", "int4", "--profile", "1"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(bfloat16|int4) +[\d.]+ +[\d.]+ +([\d.]+)x$", out, flags=re.M))
    assert rows["bfloat16"] == "1.00" and float(rows["int4"]) > 0
    assert re.search(r"^int4 +weight-only kernels [\d.]+ \(\d+%\)  dense matmuls", out, flags=re.M)


def test_cpu_bench_refuses_an_unknown_row(scripts):
    import bench_quantized_decode

    with pytest.raises(SystemExit, match=r"--variants: unknown \['int3'\]"):
        bench_quantized_decode.main(["--tiny", "--variants", "int3"])


def test_gpu_bench_quantized_section_compares_int8_and_int4_with_16_bits(scripts, tmp_path):
    import gpu_bench

    assert "quantized" not in gpu_bench.selected_sections("")  # it releases the main engine: asked for by name
    assert gpu_bench.main(["--tiny", "--backend", "cpu", "--only", "quantized", "--out", str(tmp_path)]) == 0
    section = json.loads((tmp_path / "splitfuse.json").read_text())["sections"]["quantized"]
    sizes = [section[v]["weights_MiB"] for v in ("unquantized", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True) and sizes[2] < sizes[0]
    for variant in ("int8", "int4"):
        assert section[variant]["speedup_vs_unquantized"] == pytest.approx(
            section[variant]["tokens_per_s"] / section["unquantized"]["tokens_per_s"], rel=0.01)
