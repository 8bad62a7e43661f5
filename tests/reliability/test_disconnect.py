"""A client that leaves is not served any more: its requests are aborted and free their KV blocks."""

from __future__ import annotations

import httpx
import pytest
from fault_backends import SLOW, registered

from splitfuse.testing.server import wait_idle


@pytest.fixture(scope="module")
def slow_server(start_server):
    with registered():
        return start_server(backend=SLOW)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Tell me everything", "max_tokens": 400, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Everything"}], "max_tokens": 400,
                              "ignore_eos": True}),
])
def test_a_non_streaming_client_that_leaves_is_aborted(slow_server, path, body):
    steps = slow_server.engine.stats.steps
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(slow_server.url + path, json=body, timeout=0.5)
    wait_idle(slow_server.url, timeout=5)  # 400 slow steps would take 8 s or more
    assert slow_server.engine.stats.steps - steps < 300
