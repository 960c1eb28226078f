"""Killing a real child process at a chosen moment, for the crash-and-resume tests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable


def kill_when(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    timeout_s: float = 120.0,
    poll_s: float = 0.01,
) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every ``poll_s``), as a crash or a
    preempted machine kills it, and reap it. A child still running after ``timeout_s`` is
    killed too; the caller asserts on ``proc.returncode`` (``-signal.SIGKILL`` when the kill
    came first, an exit code when the child finished before it could be killed)."""
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(poll_s)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
