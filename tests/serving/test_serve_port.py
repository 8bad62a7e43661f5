"""`splitfuse serve` on a port that is taken: one clear line and a non-zero exit, and never a
"serving on ..." line for a server that is not listening."""

from __future__ import annotations

import socket
import subprocess

from splitfuse.cli import self_command


def test_serve_on_a_busy_port_fails_fast_with_one_line(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*self_command(), "serve", "-m", tiny_model_dir("llama"), "--backend", "cpu",
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in done.stderr and "pick another --port" in done.stderr
    assert "serving" not in done.stderr and "Traceback" not in done.stderr
