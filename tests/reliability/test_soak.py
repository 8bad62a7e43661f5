"""A bounded soak: 240 mixed requests at once against a KV cache small enough to force preemption;
no unexpected error, no hang, every KV block free afterwards, greedy answers equal to each request
sent alone."""

from __future__ import annotations

import asyncio

import httpx

from splitfuse.testing.server import wait_idle
from splitfuse.testing.soak import check_alone, make_specs, soak


def test_soak_of_mixed_requests_with_preemption(start_server):
    # 32 blocks of 16 tokens hold a handful of requests; 32 at once must preempt.
    server = start_server(num_kv_blocks=32, kv_block_size=16)
    specs = make_specs(240, seed=1)
    result = asyncio.run(soak(server.url, specs, concurrency=32, timeout_s=60))
    assert result.outcomes["error"] == 0 and result.outcomes["hang"] == 0, result.errors[:5]
    assert result.outcomes["ok"] + result.outcomes["left"] == 240
    assert result.outcomes["left"] > 0 and any(spec.n > 1 for spec in specs) and any(spec.stop for spec in specs)
    stats = wait_idle(server.url)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["preemptions"] > 0
    metrics = httpx.get(server.url + "/metrics").text
    assert f"splitfuse_preemptions_total {float(stats['preemptions'])}" in metrics
    asyncio.run(check_alone(server.url, specs, result, sample=40))
    assert result.mismatches == []
