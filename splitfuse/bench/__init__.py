"""Benchmarks: latency-throughput curves and FastGen's effective throughput for splitfuse, HF
transformers and any OpenAI-compatible server, all measured the same way."""

from splitfuse.bench.runner import BenchOptions, run

__all__ = ["BenchOptions", "run"]
