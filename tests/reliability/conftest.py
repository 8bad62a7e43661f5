"""Fixtures of the reliability tests: in-process servers over the tiny llama."""

from __future__ import annotations

import pytest

import splitfuse


@pytest.fixture(scope="module")
def start_server(tiny_model_dir):
    """start_server(**options) -> a running ServerHandle over the tiny llama, terminated after the module."""
    handles = []

    def start(**options):
        options = {"backend": "cpu", "kv_block_size": 16, "num_kv_blocks": 256, **options}
        handles.append(splitfuse.serve(tiny_model_dir("llama"), **options))
        return handles[-1]

    yield start
    for handle in handles:
        handle.terminate(timeout=10)
