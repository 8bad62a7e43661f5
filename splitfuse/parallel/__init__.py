"""Tensor parallelism: every layer split over `tensor_parallel_size` processes (ranks).

The engine process is rank 0: it keeps the scheduler and the one KV block table, broadcasts each
step's batch metadata, and samples. Worker processes (ranks 1..tp-1) hold their own weight and KV
shards and run the same forward pass on every broadcast step.
"""

from splitfuse.parallel.shard import SINGLE, Shard

__all__ = ["SINGLE", "Shard"]
