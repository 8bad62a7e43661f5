"""The conformance suite for this architecture, run exactly as the docs tell a plugin author to
(with a wider init than GPT-2's own, see test_gpt2_parity.SPREAD)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_conformance_suite_passes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "splitfuse.testing.conformance",
         "--splitfuse-arch", "GPT2LMHeadModel", "--splitfuse-arch-config", '{"initializer_range": 0.2}',
         "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 4 and "failed" not in output, output[-4000:]
