"""splitfuse's own server as a benchmark system: `splitfuse serve` in a child process on loopback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
import time

import httpx

from splitfuse.bench.clients import FIXED_LENGTH_GREEDY, OpenAIClient, RequestSettings
from splitfuse.cli import engine_flags, self_command


class LocalServer(OpenAIClient):
    """splitfuse's own server, started for the run as `splitfuse serve` in a child process on loopback
    (so the client never competes with it for the GIL), measured over HTTP like any endpoint."""

    def __init__(self, model_dir: str, backend: str | None, engine: dict, send_ids: bool,
                 ready_timeout: float = 600.0, name: str = "splitfuse",
                 settings: RequestSettings = FIXED_LENGTH_GREEDY) -> None:
        super().__init__("http://127.0.0.1:0/v1", None, name, send_ids, settings=settings)
        self.model_dir, self.backend, self.engine = model_dir, backend, engine
        self.ready_timeout = ready_timeout
        self.process: asyncio.subprocess.Process | None = None

    def command(self, port: int) -> list[str]:
        cmd = [*self_command(), "serve", self.model_dir, "--host", "127.0.0.1", "--port", str(port),
               "--backend", self.backend or "auto", "--max-waiting", "100000"]
        return cmd + engine_flags(self.engine)

    async def start(self) -> None:
        with socket.socket() as sock:  # a free port; the child binds it a moment later
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the child writes to it until close()
        self.process = await asyncio.create_subprocess_exec(*self.command(port), stdout=self.log,
                                                            stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + self.ready_timeout
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                if self.process.returncode is not None:
                    self.log.seek(0)
                    tail = self.log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"splitfuse serve exited with code {self.process.returncode}:\n{tail}")
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"splitfuse serve was not healthy within {self.ready_timeout:.0f} s")
                await asyncio.sleep(0.2)
        await super().start()

    async def close(self) -> None:
        await super().close()
        if self.process is not None:
            if self.process.returncode is None:
                self.process.terminate()  # SIGTERM: the server drains and exits
                try:
                    await asyncio.wait_for(self.process.wait(), 60)
                except asyncio.TimeoutError:
                    self.process.kill()
                    await self.process.wait()
            self.process = None
            self.log.close()
