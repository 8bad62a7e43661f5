"""`splitfuse serve` as a user runs it: a subprocess that answers, then exits cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from splitfuse.testing.tiny_model import build_tokenizer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_subcommand_serves_and_drains_on_sigterm(tiny_model_dir, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitfuse", "serve", tiny_model_dir("llama"), "--backend", "cpu", "--port", str(port),
         "--num-kv-blocks", "32", "--api-key", "k", "--chat-template", str(template), "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
        auth = {"Authorization": "Bearer k"}
        models = httpx.get(url + "/v1/models", headers=auth).json()
        assert models["data"][0]["id"] == "tiny"
        chat = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
        assert chat.status_code == 200
        # The file's template renders the content alone: no BOS, no role tags.
        want = len(build_tokenizer()("hello", add_special_tokens=False)["input_ids"])
        assert chat.json()["usage"]["prompt_tokens"] == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
