"""A real ``mlx_lm.server`` process on loopback serving a model directory, for tests that need
a real OpenAI-compatible server (and a real process to kill)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlxServer:
    """``with MlxServer(model_dir) as srv: srv.url`` (its /v1 base URL); ``srv.kill()`` sends
    SIGKILL, as a crashed or preempted server dies."""

    def __init__(self, model_dir: str | Path, startup_s: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._startup_s = startup_s

    def wait_ready(self) -> MlxServer:
        deadline = time.monotonic() + self._startup_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return self
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"mlx_lm.server on port {self.port} did not come up"
                    ) from exc
                time.sleep(0.25)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> MlxServer:
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
