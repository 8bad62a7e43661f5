"""`splitfuse bench --endpoint` against Hugging Face's `transformers serve` on the demo model: figures
with the server's defaults, and a loud failure when told to send fields that server rejects."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from splitfuse.cli import main
from splitfuse.data import DEMO_MODEL_DIR

pytestmark = pytest.mark.slow
pytest.importorskip("accelerate", reason="transformers serve loads models through accelerate")
READY_S = 240  # the server imports and loads in tens of seconds on a shared CPU


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory):
    command = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if command is None:
        pytest.fail("the transformers command is not installed next to this python")
    port = free_port()
    log = (tmp_path_factory.mktemp("transformers_serve") / "log").open("w+")
    process = subprocess.Popen([command, "serve", str(DEMO_MODEL_DIR), "--device", "cpu", "--dtype", "float32",
                                "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_S
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"transformers serve exited with code {process.returncode}:\n{log.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve was not healthy within {READY_S} s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def bench(url: str, out: Path, *flags: str) -> int:
    return main(["bench", str(DEMO_MODEL_DIR), "--endpoint", url, "--out", str(out), "--clients", "2",
                 "--requests", "3", "--warmup", "0", "--prompt-len", "16", "--gen-len", "4", "--no-progress",
                 "--no-plots", *flags])


def test_bench_measures_transformers_serve_with_its_defaults(transformers_server, tmp_path):
    assert bench(transformers_server, tmp_path, "--top-p", "0.9") == 0
    system = json.loads((tmp_path / "results.json").read_text())["systems"][transformers_server]
    assert system["request_settings"]["top_p"] == 0.9 and not system["request_settings"]["ignore_eos"]
    point = system["points"][0]
    assert point["completed"] == 3 and point["failed"] == 0
    assert point["output_throughput"] > 0 and point["request_throughput"] > 0
    assert point["ttft"]["p50"] > 0
    assert set(point["effective_throughput"]) == {"2", "4", "6"}


def test_fields_the_server_rejects_fail_the_run_with_its_message(transformers_server, tmp_path, capsys):
    assert bench(transformers_server, tmp_path, "--ignore-eos", "--min-tokens") == 1
    err = capsys.readouterr().err
    assert "rejected" in err and "HTTP 422" in err and "ignore_eos" in err
